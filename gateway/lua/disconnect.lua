-- Sessions end: each goes offline at once, or lingers for the offline grace so a reconnect
-- within it is never seen as a flap. A session that is no longer current changes nothing.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:offline:seen  KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence
-- then for each device i: KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] grace ms (0: none)  ARGV[3] heartbeat TTL ms  ARGV[4] history maxlen
-- ARGV[5] events maxlen; then for each device i: ARGV[6+3i] id  ARGV[7+3i] session
--   ARGV[8+3i] reason
-- Returns per device: 1 offline now, 2 lingering, 0 stale session or already offline.
local now, grace, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local history_cap = tonumber(ARGV[4])
local result = {}
local offline = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]}
local count = (#KEYS - 7) / 3
for i = 0, count - 1 do
  local state_key, heartbeat_key, history_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i], KEYS[10 + 3 * i]
  local id, session, reason = ARGV[6 + 3 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]
  local code = 0
  if redis.call('HGET', state_key, G_SESSION) == session then
    redis.call('HSET', state_key, G_SESSION, '')
    settle_last_seen(state_key, heartbeat_key, ttl, now)
    if grace > 0 and redis.call('EXISTS', heartbeat_key) == 1 then
      redis.call('PEXPIRE', heartbeat_key, grace)
      redis.call('HSET', state_key, G_LINGER, reason)
      -- the sweep reads this score as "last renewed": due exactly when the grace ends
      redis.call('ZADD', KEYS[3], tonumber(now) + (grace - ttl) / 1000, id)
      code = 2
    else
      redis.call('DEL', heartbeat_key)
      if go_offline(state_key, history_key, offline, id, now, reason, history_cap, ARGV[5]) > 0 then
        code = 1
      end
    end
  end
  result[#result + 1] = code
end
return result
