-- A socket takes the device's one session and the device is online from now.
-- KEYS[1] device:state:{id}  KEYS[2] device:heartbeat:{id}  KEYS[3] device:history:{id}
-- KEYS[4] devices:online     KEYS[5] devices:index:online   KEYS[6] devices:online:seen
-- KEYS[7] devices:offline:seen  KEYS[8] devices:stats:online_by_type  KEYS[9] devices:events
-- KEYS[10] devices:presence (channel)  KEYS[11] gateway:control (channel)
-- ARGV[1] id  ARGV[2] session  ARGV[3] now  ARGV[4] heartbeat TTL ms  ARGV[5] history maxlen
-- ARGV[6] events maxlen  ARGV[7] token hash the handshake checked ('' to skip the check)
-- Returns {1, presence version, desired, reported, shadow version, reported_meta, event reason}
-- where the reason is '' when no presence event was due (still online: a reconnect inside the
-- offline grace, or a device the seed heartbeats); {0} for an unknown device; {-1} when the
-- token was rotated after the handshake checked it.
local id, session, now = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HEXISTS', KEYS[1], F_ID) == 0 then
  return {0}
end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'token_hash') ~= ARGV[7] then
  return {-1}
end
local previous = redis.call('HGET', KEYS[1], 'session')
-- online as far as anyone announced: a lapsed key nobody has expired yet still counts
local was_online = redis.call('EXISTS', KEYS[2]) == 1 or redis.call('ZSCORE', KEYS[5], id)
  or (SEED_SETS and redis.call('SISMEMBER', KEYS[4], id) == 1)
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
redis.call('HSET', KEYS[1], 'session', session)
redis.call('HDEL', KEYS[1], 'linger_reason')
mark_online(KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], id, now)
local superseded = previous and previous ~= '' and previous ~= session
if superseded then
  kick(KEYS[11], id, previous, 4409, 'replaced')
end
local reason = ''
if not was_online then
  reason = 'connected'
elseif superseded then
  reason = 'replaced'
end
local presence_version
if reason ~= '' then
  presence_version = presence_transition(KEYS[1], KEYS[3], KEYS[9], KEYS[10], id, 'online', now,
    reason, tonumber(ARGV[5]), ARGV[6])
else
  presence_version = tonumber(redis.call('HGET', KEYS[1], 'presence_version') or '0')
end
local shadow = redis.call('HMGET', KEYS[1], F_DESIRED, F_REPORTED, 'version',
  'reported_meta')
return {1, presence_version, shadow[1] or '{}', shadow[2] or '{}', tonumber(shadow[3] or '0'),
  shadow[4] or '{}', reason}
