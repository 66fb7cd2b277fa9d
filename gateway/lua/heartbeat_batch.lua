-- One tick of heartbeats from many devices: one call instead of a round trip per frame.
-- Only a device's current session may write; the latest reported document of the tick wins.
-- The cheap path is the common one, counted in server instructions (callgrind): a bare beat
-- reads two fields and renews the TTL in place; `last_seen` and the last-seen indexes move at
-- most once a second per device (when the beat's second differs from the one last indexed:
-- a string comparison, no number parsing); the key is rewritten only when it had lapsed.
-- A changed reported document bumps `version` and `reported_version` in the same HSET.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:seen    KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence (channel)
-- then for each device i (from 0): KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] history maxlen  ARGV[3] events maxlen
-- then for each device i: ARGV[4+6i] id  ARGV[5+6i] session  ARGV[6+6i] seen at (epoch s)
--   ARGV[7+6i] TTL to set, ms (the timeout less the age of a frame re-asserted late)
--   ARGV[8+6i] reported JSON ('' when the tick carried none)  ARGV[9+6i] reported_meta JSON
-- Returns {code, shadow version} per device: code 1 written, 2 written and back online after
-- it had gone offline while its socket lived (`resumed`), -1 stale session (nothing written),
-- 0 unknown device. The version is 0 for a beat without reported state.
local now, history_maxlen, events_maxlen = ARGV[1], ARGV[2], ARGV[3]
local result = {}
local count = (#KEYS - 7) / 3
for i = 0, count - 1 do
  local state_key, heartbeat_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i]
  local base = 4 + 6 * i
  local id, session, seen_at, px = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local reported = ARGV[base + 4]
  local current
  if reported == '' then
    current = redis.call('HMGET', state_key, 'session', 'indexed_at')
  else
    current = redis.call('HMGET', state_key, 'session', 'indexed_at', F_REPORTED, 'version',
      'reported_version')
  end
  local code, version = 1, 0
  if not current[1] then
    code = 0
  elseif current[1] ~= session then
    code = -1
  else
    local second = string.match(seen_at, '^%d+')
    local lapsed = redis.call('PEXPIRE', heartbeat_key, px) == 0
    local indexed = lapsed or second ~= current[2]
    if lapsed then
      redis.call('SET', heartbeat_key, session, 'PX', px)
      -- announced offline (an expiry ran) → `resumed`; a key lost unannounced (Redis
      -- restarted, a stall) → renewed silently: nobody ever saw this device go offline
      if not redis.call('ZSCORE', KEYS[2], id) then
        code = 2
      end
      mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
    elseif indexed then
      redis.call('ZADD', KEYS[3], seen_at, id)
      redis.call('ZADD', KEYS[4], seen_at, id)
    end
    local changed = reported ~= '' and reported ~= current[3]
    if changed then
      version = (tonumber(current[4]) or 0) + 1
      local reported_version = (tonumber(current[5]) or 0) + 1
      redis.call('HSET', state_key, F_SEEN, stored_time(seen_at), 'indexed_at', second,
        F_REPORTED, reported, 'reported_meta', ARGV[base + 5], 'version', version,
        'reported_version', reported_version)
    elseif indexed then
      redis.call('HSET', state_key, F_SEEN, stored_time(seen_at), 'indexed_at', second)
    end
    if reported ~= '' and not changed then
      version = tonumber(current[4]) or 0
    end
    if code == 2 then
      presence_transition(state_key, KEYS[10 + 3 * i], KEYS[6], KEYS[7], id, 'online', now,
        'resumed', history_maxlen, events_maxlen)
    end
    if changed then
      stream_add(KEYS[10 + 3 * i], KEYS[6], history_maxlen, events_maxlen,
        '{"type":"state","device_id":"' .. id .. '","section":"reported","version":' ..
        version .. ',"timestamp":' .. now .. ',"state":' .. reported)
    end
  end
  result[#result + 1] = code
  result[#result + 1] = version
end
return result
