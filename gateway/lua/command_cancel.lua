-- Cancel a command that is not final yet; a final one is left as it is.
-- KEYS[1] devices:commands:due  KEYS[2] devices:commands:counts  KEYS[3] devices:events
-- KEYS[4] devices:commands (channel)  KEYS[5] device:commands:pending:{id}
-- KEYS[6] device:commands:done:{id}  KEYS[7] device:command:{id}:{command id}
-- KEYS[8] device:{id}:commands (channel)
-- ARGV[1] now  ARGV[2] retention (s)  ARGV[3] most final commands kept per device
-- ARGV[4] events maxlen  ARGV[5] id  ARGV[6] command id
-- Returns {1, status before} when canceled, {-1, final status} when final already, {0} unknown.
local f = redis.call('HMGET', KEYS[7], 'status')
if not f[1] then
  return {0}
end
if FINAL[f[1]] then
  return {-1, f[1]}
end
finish(partition_keys(1), KEYS[7], KEYS[5], KEYS[6], KEYS[8], ARGV[5], ARGV[6], 'canceled', nil,
  nil, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4])
return {1, f[1]}
