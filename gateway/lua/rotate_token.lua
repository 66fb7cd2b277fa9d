-- Issue or rotate a device token: the old one stops working at once and a live session that
-- used it is closed (1008) wherever it runs.
-- KEYS[1] device:state:{id}  KEYS[2] gateway:control (channel)
-- ARGV[1] id  ARGV[2] hash of the new token
-- Returns 1 when rotated, 0 for an unknown device (no hash, or a hash without `device_id`).
if redis.call('HEXISTS', KEYS[1], F_ID) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], G_TOKEN_HASH, ARGV[2])
local session = redis.call('HGET', KEYS[1], G_SESSION)
if session and session ~= '' then
  kick(KEYS[2], ARGV[1], session, 1008, 'token_rotated')
end
return 1
