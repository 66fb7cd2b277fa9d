-- Accept a command for a device: sent at once to its live session, else queued for its next
-- connect (within its ttl). Each refusal writes nothing.
-- KEYS[1] device:state:{id}  KEYS[2] device:heartbeat:{id}  KEYS[3] device:commands:pending:{id}
-- KEYS[4] device:commands:done:{id}  KEYS[5] device:command:{id}:{command id}
-- KEYS[6] device:{id}:commands (channel)
-- KEYS[7] devices:commands:due  KEYS[8] devices:commands:counts  KEYS[9] devices:events
-- KEYS[10] devices:commands (channel)
-- ARGV[1] id  ARGV[2] command id  ARGV[3] name  ARGV[4] params JSON  ARGV[5] timeout (s)
-- ARGV[6] ttl (s)  ARGV[7] now  ARGV[8] most pending commands per device  ARGV[9] events maxlen
-- ARGV[10] seconds the record may outlive its ttl and timeout before Redis drops it unfinished
--   (a bound, never reached: every pending command is finished by its due time)
-- Returns {1, status, created_at, deadline, attempts, pending commands now} when accepted; {2, status} when a command
-- with this id and the same content exists (a repeated request); {-1} unknown device;
-- {-2, pending} queue full; {-3} this id names another command; {-4} ttl 0 and the device is
-- not connected.
local id, cid, now = ARGV[1], ARGV[2], ARGV[7]
if redis.call('HEXISTS', KEYS[1], F_ID) == 0 then
  return {-1}
end
local existing = redis.call('HMGET', KEYS[5], 'name', 'params', 'timeout', 'ttl', 'status')
if existing[1] then
  if existing[1] == ARGV[3] and existing[2] == ARGV[4] and existing[3] == ARGV[5] and
      existing[4] == ARGV[6] then
    return {2, existing[5]}
  end
  return {-3}
end
local pending = redis.call('ZCARD', KEYS[3])
if pending >= tonumber(ARGV[8]) then
  return {-2, pending}
end
local session = redis.call('HGET', KEYS[1], G_SESSION)
local connected = session and session ~= '' and redis.call('EXISTS', KEYS[2]) == 1
if tonumber(ARGV[6]) == 0 and not connected then
  return {-4}
end
-- its place in the device's order: after every command the device already has, whatever the
-- clocks of the processes that accepted them
local seq = ms_of(now) * 1000
for _, set in ipairs({KEYS[3], KEYS[4]}) do
  local last = redis.call('ZRANGE', set, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= seq then
    seq = tonumber(last[2]) + 1
  end
end
redis.call('HSET', KEYS[5], 'name', ARGV[3], 'params', ARGV[4], 'status', 'queued',
  'created_at', now, 'attempts', 0, 'timeout', ARGV[5], 'ttl', ARGV[6], 'seq',
  string.format('%.0f', seq))
redis.call('EXPIRE', KEYS[5], math.ceil(tonumber(ARGV[6]) + tonumber(ARGV[5]) + tonumber(ARGV[10])))
redis.call('ZADD', KEYS[3], string.format('%.0f', seq), cid)
redis.call('HINCRBY', KEYS[8], 'queued', 1)
local c = partition_keys(7)
if connected then
  send_command(c, KEYS[5], KEYS[6], id, cid, session, now, ARGV[9])
  return {1, 'sent', now, redis.call('HGET', KEYS[5], 'deadline'), 1, pending + 1}
end
redis.call('ZADD', KEYS[7], ms_of(now) + ms_of(ARGV[6]), id .. '/' .. cid)
command_event(KEYS[9], KEYS[10], ARGV[9], id, cid, ARGV[3], 'queued', 0, now, nil)
return {1, 'queued', now, '', 0, pending + 1}
