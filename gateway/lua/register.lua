-- Register a device; refuses an id that exists (whoever wrote it: the seed's classes too).
-- A device exists when its hash has `device_id`; a hash without one (another program's
-- heartbeat for an id nobody registered) is no device, and is replaced whole.
-- KEYS[1] device:state:{id}     KEYS[2] devices:registered   KEYS[3] devices:type:{type}
-- KEYS[4] devices:index         KEYS[5] devices:index:type:{type}
-- KEYS[6] devices:offline:seen  KEYS[7] devices:types        KEYS[8] devices:presence:retired
-- KEYS[9] devices:events
-- ARGV[1] id  ARGV[2] type  ARGV[3] now  ARGV[4] metadata JSON  ARGV[5] token hash
-- ARGV[6] events maxlen
-- Returns 1 when registered, 0 when the id already exists.
if redis.call('HEXISTS', KEYS[1], F_ID) == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
local id, device_type, now = ARGV[1], ARGV[2], ARGV[3]
local presence_version = redis.call('HGET', KEYS[8], id) or '0'
redis.call('HDEL', KEYS[8], id)
-- the fields heartbeats read and write come first: a compact (listpack) hash is searched
-- from its start
redis.call('HSET', KEYS[1], G_SESSION, '', F_SEEN, '0', F_STATUS, 'offline', F_REPORTED, '{}',
  G_REPORTED_META, '{}', G_VERSION, 0, G_REPORTED_VERSION, 0,
  F_ID, id, F_TYPE, device_type, F_REGISTERED, stored_time(now), F_DESIRED, '{}',
  F_METADATA, ARGV[4], G_PRESENCE_VERSION, presence_version, G_TOKEN_HASH, ARGV[5],
  G_DESIRED_META, '{}', G_DESIRED_VERSION, 0, G_DESIRED_SHA, short_sha(redis.sha1hex('{}')))
if SEED_SETS then
  redis.call('SADD', KEYS[2], id)
  redis.call('SADD', KEYS[3], id)
end
redis.call('SADD', KEYS[7], device_type)
redis.call('ZADD', KEYS[4], 0, id)
redis.call('ZADD', KEYS[5], 0, id)
redis.call('ZADD', KEYS[6], -tonumber(now), id)
record(nil, KEYS[9], 0, ARGV[6], 'registered', id, ',"device_type":"' .. device_type ..
  '","timestamp":' .. now)
return 1
