-- Devices whose heartbeat key is gone go offline: run for keyspace `expired` notifications
-- and by the sweep. A heartbeat that exists again means the device came back: left alone.
-- Any number of detectors may pass the same id; the first one publishes, the rest find nothing.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:offline:seen  KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence
-- then for each device i: KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] history maxlen  ARGV[3] events maxlen  ARGV[4] heartbeat TTL ms;
-- then ARGV[5+i] id
-- Returns per device the new presence version, or 0 when nothing was due. A device whose key
-- still exists is re-scored in the last-seen index to when it is really due, so renewals by
-- other writers (the seed) never keep it at the stale head the sweep reads.
local now, history_cap = ARGV[1], tonumber(ARGV[2])
local result = {}
local offline = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]}
local count = (#KEYS - 7) / 3
for i = 0, count - 1 do
  local state_key, heartbeat_key, history_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i], KEYS[10 + 3 * i]
  local version = 0
  local remaining = redis.call('PTTL', heartbeat_key)
  if remaining >= 0 then
    -- never in the future: a heartbeat another program set with a longer TTL stays findable
    redis.call('ZADD', KEYS[3], 'XX',
      math.min(tonumber(now), tonumber(now) + (remaining - tonumber(ARGV[4])) / 1000), ARGV[5 + i])
  elseif remaining == -2 then
    local reason = redis.call('HGET', state_key, G_LINGER)
    if not reason or reason == '' then
      reason = 'expired'
    end
    version = go_offline(state_key, history_key, offline, ARGV[5 + i], now, reason, history_cap,
      ARGV[3])
  end
  result[#result + 1] = version
end
return result
