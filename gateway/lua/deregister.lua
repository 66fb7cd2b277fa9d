-- Deregister a device: offline (`deleted`) if it was online, its live session kicked (1008),
-- every key and index entry removed. Its presence version is kept so a new registration of
-- the same id continues the sequence instead of resetting it.
-- KEYS[1] device:state:{id}   KEYS[2] device:heartbeat:{id}  KEYS[3] device:history:{id}
-- KEYS[4] devices:registered  KEYS[5] devices:online         KEYS[6] devices:index
-- KEYS[7] devices:index:online KEYS[8] devices:offline:seen  KEYS[9] devices:online:seen
-- KEYS[10] devices:stats:online_by_type  KEYS[11] devices:presence:retired
-- KEYS[12] devices:events     KEYS[13] devices:type:{type}   KEYS[14] devices:index:type:{type}
-- KEYS[15] devices:types      KEYS[16] devices:presence (channel)  KEYS[17] gateway:control
-- KEYS[18] device:commands:pending:{id}  KEYS[19] device:commands:done:{id}
-- KEYS[20] devices:commands:due  KEYS[21] devices:commands:counts
-- KEYS[22] devices:commands (channel)
-- ARGV[1] id  ARGV[2] type (as read before the call)  ARGV[3] now  ARGV[4] events maxlen
-- ARGV[5] the device's command base (its command key without the command id)
-- Its pending commands end `canceled`; every command record of it is removed.
-- Returns 1 when deleted, 0 when unknown, -1 when the type changed meanwhile (read again).
local id, now = ARGV[1], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local device_type = redis.call('HGET', KEYS[1], F_TYPE)
if device_type ~= ARGV[2] then
  return -1
end
local session = redis.call('HGET', KEYS[1], G_SESSION)
go_offline(KEYS[1], nil, {KEYS[5], KEYS[7], KEYS[9], KEYS[8], KEYS[10], KEYS[12], KEYS[16]}, id,
  now, 'deleted', 0, ARGV[4])
if session and session ~= '' then
  kick(KEYS[17], id, session, 1008, 'deleted')
end
drop_commands({KEYS[20], KEYS[21], KEYS[12], KEYS[22]}, KEYS[18], KEYS[19], ARGV[5], id, now,
  ARGV[4])
local presence_version = redis.call('HGET', KEYS[1], G_PRESENCE_VERSION) or '0'
redis.call('HSET', KEYS[11], id, presence_version)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if SEED_SETS then
  redis.call('SREM', KEYS[4], id)
  redis.call('SREM', KEYS[13], id)
end
redis.call('ZREM', KEYS[6], id)
redis.call('ZREM', KEYS[8], id)
redis.call('ZREM', KEYS[14], id)
if redis.call('ZCARD', KEYS[14]) == 0 then
  redis.call('SREM', KEYS[15], device_type)
  redis.call('HDEL', KEYS[10], device_type)
end
record(nil, KEYS[12], 0, ARGV[4], 'deleted', id, ',"timestamp":' .. now)
return 1
