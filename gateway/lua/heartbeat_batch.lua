-- One tick of heartbeats from many devices: one call instead of a round trip per frame.
-- Only a device's current session may write; the latest reported document of the tick wins.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:seen    KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence (channel)
-- then for each device i (from 0): KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] heartbeat TTL ms  ARGV[3] history maxlen  ARGV[4] events maxlen
-- then for each device i: ARGV[5+5i] id  ARGV[6+5i] session  ARGV[7+5i] seen at (epoch s)
--   ARGV[8+5i] reported JSON ('' when the tick carried none)  ARGV[9+5i] reported_meta JSON
-- Returns {code, shadow version} per device: code 1 written, 2 written and back online after
-- it had gone offline while its socket lived (`resumed`), -1 stale session (nothing written),
-- 0 unknown device.
local now, ttl, history_maxlen, events_maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local result = {}
local count = (#KEYS - 7) / 3
for i = 0, count - 1 do
  local state_key, heartbeat_key, history_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i], KEYS[10 + 3 * i]
  local base = 5 + 5 * i
  local id, session, seen_at = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local reported, reported_meta = ARGV[base + 3], ARGV[base + 4]
  local current = redis.call('HGET', state_key, 'session')
  local code, version = 1, 0
  if not current then
    code = 0
  elseif current ~= session then
    code = -1
  else
    local lapsed = not redis.call('SET', heartbeat_key, session, 'PX', ttl, 'GET')
    -- a key lost while nobody published offline (Redis restarted, a stall): renew silently
    if lapsed and redis.call('ZSCORE', KEYS[2], id) then
      lapsed = false
      mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
    end
    if lapsed then
      code = 2
      mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
      presence_transition(state_key, history_key, KEYS[6], KEYS[7], id, 'online', now, 'resumed',
        history_maxlen, events_maxlen)
    else
      redis.call('HSET', state_key, 'last_seen', seen_at)
      redis.call('ZADD', KEYS[3], seen_at, id)
      redis.call('ZADD', KEYS[4], seen_at, id)
    end
    if reported ~= '' then
      if redis.call('HGET', state_key, 'reported_state') ~= reported then
        redis.call('HSET', state_key, 'reported_state', reported, 'reported_meta', reported_meta)
        version = redis.call('HINCRBY', state_key, 'version', 1)
        stream_add(history_key, KEYS[6], history_maxlen, events_maxlen,
          '{"type":"state","device_id":"' .. id .. '","section":"reported","version":' ..
          version .. ',"timestamp":' .. now .. ',"state":' .. reported)
      else
        version = tonumber(redis.call('HGET', state_key, 'version') or '0')
      end
    end
  end
  result[#result + 1] = code
  result[#result + 1] = version
end
return result
