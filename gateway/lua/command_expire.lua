-- Commands whose due time came (a local timer or the sweep of the due head says so), many per
-- call; any number of processes may pass the same ones: what is not due, or final, is left.
-- A sent command whose deadline passed: `timed_out` if the session it went to is still the
-- device's live one; else (that session ended before the device answered) sent again to the
-- device's live session, or back to `queued` for its next connect, while its ttl lasts, and
-- `timed_out` once it does not. A queued command whose ttl is over: `expired` (never sent) or
-- `timed_out` (sent before, never answered).
-- KEYS[1] devices:commands:due  KEYS[2] devices:commands:counts  KEYS[3] devices:events
-- KEYS[4] devices:commands (channel)
-- then for each command i (from 0): KEYS[5+6i] device:state:{id}  KEYS[6+6i] device:heartbeat:{id}
--   KEYS[7+6i] device:commands:pending:{id}  KEYS[8+6i] device:commands:done:{id}
--   KEYS[9+6i] device:command:{id}:{command id}  KEYS[10+6i] device:{id}:commands (channel)
-- ARGV[1] now  ARGV[2] retention (s)  ARGV[3] most final commands kept per device
-- ARGV[4] events maxlen; then for each command i: ARGV[5+2i] id  ARGV[6+2i] command id
-- Returns per command {status after ('' when gone), epoch ms it is due next (0: never),
-- 1 when this call changed it (else 0)}.
local now, retention, done_max, events_maxlen = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  ARGV[4]
local now_ms = ms_of(now)
local c = partition_keys(1)
local replies = {}
for i = 0, (#KEYS - 4) / 6 - 1 do
  local state_key, heartbeat_key, pending_key, done_key, key, channel = KEYS[5 + 6 * i],
    KEYS[6 + 6 * i], KEYS[7 + 6 * i], KEYS[8 + 6 * i], KEYS[9 + 6 * i], KEYS[10 + 6 * i]
  local id, cid = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  local member = id .. '/' .. cid
  local f = redis.call('HMGET', key, 'status', 'session', 'created_at', 'ttl', 'deadline')
  local reply
  if not f[1] or FINAL[f[1]] then
    redis.call('ZREM', c[1], member)
    reply = {f[1] or '', 0, 0}
  else
    local ends = ms_of(f[3]) + ms_of(f[4])
    local due = f[1] == 'sent' and ms_of(f[5]) or ends
    if due > now_ms then
      redis.call('ZADD', c[1], due, member)
      reply = {f[1], due, 0}
    elseif f[1] == 'queued' then
      local status, why = ttl_over(key)
      finish(c, key, pending_key, done_key, channel, id, cid, status, nil, why, now, retention,
        done_max, events_maxlen)
      reply = {status, 0, 1}
    else
      local session = redis.call('HGET', state_key, G_SESSION)
      local live = session and session ~= '' and redis.call('EXISTS', heartbeat_key) == 1
      if live and session == f[2] then
        finish(c, key, pending_key, done_key, channel, id, cid, 'timed_out', nil, NO_ANSWER, now,
          retention, done_max, events_maxlen)
        reply = {'timed_out', 0, 1}
      elseif ends <= now_ms then
        finish(c, key, pending_key, done_key, channel, id, cid, 'timed_out', nil, TTL_OVER, now,
          retention, done_max, events_maxlen)
        reply = {'timed_out', 0, 1}
      elseif live then
        send_command(c, key, channel, id, cid, session, now, events_maxlen)
        reply = {'sent', ms_of(redis.call('HGET', key, 'deadline')), 1}
      else
        requeue(c, key, id, cid, f[3], f[4], now, events_maxlen)
        reply = {'queued', ends, 1}
      end
    end
  end
  replies[i + 1] = reply
end
return replies
