-- Bring devices written by other programs (the seed's classes) into the gateway's indexes.
-- Idempotent; publishes nothing: whoever registered or heartbeated them announced it.
-- KEYS[1] devices:index  KEYS[2] devices:offline:seen  KEYS[3] devices:types
-- KEYS[4] devices:index:online  KEYS[5] devices:online:seen  KEYS[6] devices:stats:online_by_type
-- then for each device i: KEYS[7+4i] device:state:{id}  KEYS[8+4i] device:heartbeat:{id}
--   KEYS[9+4i] devices:type:{type}  KEYS[10+4i] devices:index:type:{type}
-- ARGV for each device i: ARGV[1+2i] id  ARGV[2+2i] its type as read before the call
-- Returns the number of devices that were missing from an index.
local adopted = 0
for i = 0, (#KEYS - 6) / 4 - 1 do
  local state_key, heartbeat_key = KEYS[7 + 4 * i], KEYS[8 + 4 * i]
  local id, device_type = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local fields = redis.call('HMGET', state_key, F_TYPE, F_SEEN, F_REGISTERED)
  if fields[1] == device_type then
    local changed = redis.call('ZADD', KEYS[1], 'NX', 0, id)
    local seen = time_of(fields[2])
    if seen <= 0 then
      seen = -time_of(fields[3])
    end
    redis.call('SADD', KEYS[3], device_type)
    redis.call('SADD', KEYS[9 + 4 * i], id)
    changed = changed + redis.call('ZADD', KEYS[10 + 4 * i], 'NX', 0, id)
    if redis.call('EXISTS', heartbeat_key) == 1 then
      if redis.call('ZADD', KEYS[4], 'NX', 0, id) == 1 then
        redis.call('HINCRBY', KEYS[6], device_type, 1)
        redis.call('ZADD', KEYS[5], math.max(seen, 0), id)
        redis.call('ZREM', KEYS[2], id)
        changed = changed + 1
      end
    elseif not redis.call('ZSCORE', KEYS[4], id) then
      -- GT: a device the seed heartbeats moves forward in the last-seen index, never back
      changed = changed + redis.call('ZADD', KEYS[2], 'GT', 'CH', seen, id)
    end
    if changed > 0 then
      adopted = adopted + 1
    end
  end
end
return adopted
