-- Results that devices sent, many per call: each finishes its command (`succeeded` or
-- `failed`) unless the command is unknown, was never sent, or is final already; then nothing
-- changes (a late or repeated result).
-- KEYS[1] devices:commands:due  KEYS[2] devices:commands:counts  KEYS[3] devices:events
-- KEYS[4] devices:commands (channel)
-- then for each result i (from 0): KEYS[5+4i] device:commands:pending:{id}
--   KEYS[6+4i] device:commands:done:{id}  KEYS[7+4i] device:command:{id}:{command id}
--   KEYS[8+4i] device:{id}:commands (channel)
-- ARGV[1] now  ARGV[2] retention (s)  ARGV[3] most final commands kept per device
-- ARGV[4] events maxlen; then for each result i: ARGV[5+5i] id  ARGV[6+5i] command id
--   ARGV[7+5i] status (succeeded | failed)  ARGV[8+5i] result JSON ('' for none)
--   ARGV[9+5i] error as a JSON string literal ('' for none)
-- Returns per result {code, status, created_at, sent_at}: code 1 finished now, 0 unknown (or
-- never sent), -1 final already (status is the final one).
local now, retention, done_max, events_maxlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  ARGV[4]
local c = partition_keys(1)
local replies = {}
for i = 0, (#KEYS - 4) / 4 - 1 do
  local pending_key, done_key, key, channel = KEYS[5 + 4 * i], KEYS[6 + 4 * i], KEYS[7 + 4 * i],
    KEYS[8 + 4 * i]
  local id, cid, status = ARGV[5 + 5 * i], ARGV[6 + 5 * i], ARGV[7 + 5 * i]
  local f = redis.call('HMGET', key, 'status', 'attempts', 'created_at', 'sent_at')
  local reply
  if not f[1] or (tonumber(f[2]) or 0) == 0 then
    reply = {0, '', '', ''}
  elseif FINAL[f[1]] then
    reply = {-1, f[1], f[3], f[4] or ''}
  else
    local result, error_json = ARGV[8 + 5 * i], ARGV[9 + 5 * i]
    finish(c, key, pending_key, done_key, channel, id, cid, status,
      result ~= '' and result or nil, error_json ~= '' and error_json or nil, now, retention,
      done_max, events_maxlen)
    reply = {1, status, f[3], f[4] or ''}
  end
  replies[i + 1] = reply
end
return replies
