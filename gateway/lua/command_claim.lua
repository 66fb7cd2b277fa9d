-- After this process lost its pub/sub connection (Redis restarted, a failover, a slot moved),
-- its live sessions may have missed commands sent to them meanwhile: each listed session gets
-- its device's pending commands again (a new attempt each; devices dedupe by command id). A
-- session that is no longer its device's current one gets nothing.
-- KEYS[1] devices:commands:due  KEYS[2] devices:commands:counts  KEYS[3] devices:events
-- KEYS[4] devices:commands (channel)
-- then for each session i (from 0): KEYS[5+4i] device:state:{id}
--   KEYS[6+4i] device:commands:pending:{id}  KEYS[7+4i] device:commands:done:{id}
--   KEYS[8+4i] device:{id}:commands (channel)
-- ARGV[1] now  ARGV[2] retention (s)  ARGV[3] most final commands kept per device
-- ARGV[4] events maxlen; then for each session i: ARGV[5+3i] id  ARGV[6+3i] session
--   ARGV[7+3i] the device's command base (keys.py: its command key without the command id)
-- Returns per session the list of frames sent, oldest first.
local now, retention, done_max, events_maxlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  ARGV[4]
local c = partition_keys(1)
local replies = {}
for i = 0, (#KEYS - 4) / 4 - 1 do
  local id, session = ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  local frames = {}
  if redis.call('HGET', KEYS[5 + 4 * i], G_SESSION) == session then
    frames = claim(c, KEYS[6 + 4 * i], KEYS[7 + 4 * i], ARGV[7 + 3 * i], KEYS[8 + 4 * i], id,
      session, now, retention, done_max, events_maxlen)
  end
  replies[i + 1] = frames
end
return replies
