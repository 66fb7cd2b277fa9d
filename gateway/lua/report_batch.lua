-- One tick of heartbeats that carry the device's reported state, from many devices. As
-- heartbeat_batch.lua, and: the latest reported document of the tick wins; a changed one
-- bumps `version` and `reported_version` in the same HSET that moves `last_seen`, and is
-- recorded (the device's history and the fleet log).
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:offline:seen  KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence (channel)
-- then for each device i (from 0): KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] heartbeat TTL ms  ARGV[3] history maxlen  ARGV[4] events maxlen
-- ARGV[5] how many devices come first with 5 arguments each and ARGV[2]'s TTL: id, session,
--   seen at (epoch s; '' when the last-seen index stays), reported JSON, reported_meta JSON;
--   the rest carry a 6th, their own TTL in ms
-- Returns {code, shadow version} per device; codes as heartbeat_batch.lua's.
local now, history_cap, events_maxlen = ARGV[1], tonumber(ARGV[3]), ARGV[4]
local plain = tonumber(ARGV[5])
local call = redis.call
local result = {}
local recorded = false
local arg = 6
for i = 0, (#KEYS - 7) / 3 - 1 do
  local state_key, heartbeat_key, history_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i], KEYS[10 + 3 * i]
  local id, session, seen_at, px = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2], ARGV[2]
  local reported, meta = ARGV[arg + 3], ARGV[arg + 4]
  if i < plain then
    arg = arg + 5
  else
    px = ARGV[arg + 5]
    arg = arg + 6
  end
  local current = call('HMGET', state_key, G_SESSION, F_REPORTED, G_VERSION, G_REPORTED_VERSION)
  local code, version = 1, 0
  if not current[1] then
    code = 0
  elseif current[1] ~= session then
    code = -1
  else
    local lapsed = call('PEXPIRE', heartbeat_key, px) == 0
    if lapsed then
      call('SET', heartbeat_key, '1', 'PX', px)
      if not call('ZSCORE', KEYS[2], id) then
        code = 2
      end
      seen_at = renewal_seen(state_key, seen_at, now)
      mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
    elseif seen_at ~= '' then
      call('ZADD', KEYS[3], seen_at, id)
    end
    version = tonumber(current[3]) or 0
    local changed = reported ~= current[2]
    if changed then
      -- each number turned to text once: for the hash and for the event
      version = version + 1
      local reported_version = (tonumber(current[4]) or 0) + 1
      if seen_at ~= '' and not lapsed then
        call('HSET', state_key, F_SEEN, stored_time(seen_at), F_REPORTED, reported,
          G_REPORTED_META, meta, G_VERSION, version, G_REPORTED_VERSION, reported_version)
      else
        call('HSET', state_key, F_REPORTED, reported, G_REPORTED_META, meta, G_VERSION, version,
          G_REPORTED_VERSION, reported_version)
      end
    elseif seen_at ~= '' and not lapsed then
      call('HSET', state_key, F_SEEN, stored_time(seen_at))
    end
    if code == 2 then
      presence_transition(state_key, history_key, KEYS[6], KEYS[7], id, 'online', now, 'resumed',
        history_cap, events_maxlen)
    end
    if changed then
      recorded = true
      record(history_key, KEYS[6], history_cap, nil, 'state', id,
        ',"section":"reported","version":' .. version .. ',"timestamp":' .. now ..
        ',"state":' .. reported, '"r",' .. version .. ',' .. reported)
    end
  end
  result[2 * i + 1] = code
  result[2 * i + 2] = version
end
if recorded then
  call('XTRIM', KEYS[6], 'MAXLEN', '~', events_maxlen)
end
return result
