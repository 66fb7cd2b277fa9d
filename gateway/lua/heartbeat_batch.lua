-- One tick of bare heartbeats (no reported state) from many devices: one call instead of a
-- round trip per frame. Only a device's current session may renew.
-- The common path is counted in server instructions (callgrind): one field read, the TTL
-- renewed in place, and, when the caller says the beat moves the device's last seen (at most
-- once per index step: the caller tracks the step it last wrote), `last_seen` and the online
-- last-seen index. The heartbeat key is rewritten only when it had lapsed.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:offline:seen  KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence (channel)
-- then for each device i (from 0): KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] heartbeat TTL ms  ARGV[3] history maxlen  ARGV[4] events maxlen
-- ARGV[5] how many devices come first with 3 arguments each and ARGV[2]'s TTL: id, session,
--   seen at (epoch s; '' when the last-seen index stays); the rest carry a 4th, their own TTL
--   in ms (a frame re-asserted late gets only what was left of its TTL)
-- Returns a code per device: 1 renewed, 2 renewed and back online after it had gone offline
-- while its socket lived (`resumed`), -1 stale session (nothing written), 0 unknown device.
local now, history_cap, events_maxlen = ARGV[1], tonumber(ARGV[3]), ARGV[4]
local plain = tonumber(ARGV[5])
local call = redis.call
local result = {}
local arg = 6
for i = 0, (#KEYS - 7) / 3 - 1 do
  local state_key, heartbeat_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i]
  local id, session, seen_at, px = ARGV[arg], ARGV[arg + 1], ARGV[arg + 2], ARGV[2]
  if i < plain then
    arg = arg + 3
  else
    px = ARGV[arg + 3]
    arg = arg + 4
  end
  local current = call('HGET', state_key, G_SESSION)
  local code = 1
  if not current then
    code = 0
  elseif current ~= session then
    code = -1
  elseif call('PEXPIRE', heartbeat_key, px) == 0 then
    call('SET', heartbeat_key, '1', 'PX', px)
    -- announced offline (an expiry ran) → `resumed`; a key lost unannounced (Redis
    -- restarted, a stall) → renewed silently: nobody ever saw this device go offline
    if not call('ZSCORE', KEYS[2], id) then
      code = 2
    end
    seen_at = renewal_seen(state_key, seen_at, now)
    mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
    if code == 2 then
      presence_transition(state_key, KEYS[10 + 3 * i], KEYS[6], KEYS[7], id, 'online', now,
        'resumed', history_cap, events_maxlen)
    end
  elseif seen_at ~= '' then
    call('HSET', state_key, F_SEEN, stored_time(seen_at))
    call('ZADD', KEYS[3], seen_at, id)
  end
  result[i + 1] = code
end
return result
