-- Helpers of the command scripts, and of connect.lua, which hands a new session the device's
-- pending commands. scripts.py puts this file after _lib.lua in front of those scripts only.
--
-- A command is the hash `<command base><command id>`: the base names the device (keys.py
-- formats it, with the device's hash tag on a cluster, so every command key shares the
-- device's slot). Its members: name, params (JSON), status, created_at, sent_at,
-- completed_at (epoch seconds as text), attempts, result (JSON), error, timeout and ttl
-- (seconds), session (the one it was last sent to), deadline (when that attempt's answer is
-- due), seq (its place in the device's order).
-- The device's `pending` zset holds its non-final commands and `done` its final ones, both
-- scored by seq; the partition's `due` zset holds `<device id>/<command id>` scored by the
-- epoch ms when something is due (a queued command's ttl, a sent one's deadline); its
-- `counts` hash counts pending commands by status (queued, sent).
-- A command whose status is final never changes again.

local FINAL = {succeeded = true, failed = true, timed_out = true, expired = true, canceled = true}
local TTL_OVER = '"the ttl ran out before the device answered"'
local NO_ANSWER = '"no answer within the timeout"'
local NEVER_SENT = '"the device did not connect within the ttl"'

local function ms_of(seconds)
  return math.floor(tonumber(seconds) * 1000 + 0.5)
end

local function seconds_text(ms)
  return string.format('%.3f', ms / 1000)
end

-- Record a status change: in the partition's fleet log (`record` in _lib.lua) and on the
-- fleet's command channel, the same JSON plus its log id. *error_json* is a JSON string
-- literal or nil.
local function command_event(events_key, channel, events_maxlen, id, cid, name, status, attempt,
                             now, error_json)
  local rest = ',"command_id":"' .. cid .. '","name":"' .. name .. '","status":"' .. status ..
    '","attempt":' .. attempt .. ',"timestamp":' .. now
  if error_json then
    rest = rest .. ',"error":' .. error_json
  end
  local stream_id = record(nil, events_key, 0, events_maxlen, 'command', id, rest)
  redis.call(PUBLISH, channel, '{"type":"command",' .. id_json(id) .. rest .. ',"stream_id":"' ..
    stream_id .. '"}')
end

-- The partition's keys every command script takes, in this order (`Partition.command_keys`).
-- c = {due, counts, events, fleet command channel}
local function partition_keys(first)
  return {KEYS[first], KEYS[first + 1], KEYS[first + 2], KEYS[first + 3]}
end

-- Send a pending command to *session*: a new attempt with its own deadline. With a
-- *device_channel*, published there for the process that holds that session (and only that
-- one sends it: the message names the session); without, the caller holds the session and
-- sends the frame itself. Returns the frame.
local function send_command(c, key, device_channel, id, cid, session, now, events_maxlen)
  local f = redis.call('HMGET', key, 'name', 'params', 'timeout', 'attempts', 'status')
  local attempt = (tonumber(f[4]) or 0) + 1
  local deadline_ms = ms_of(now) + ms_of(f[3])
  local deadline = seconds_text(deadline_ms)
  redis.call('HSET', key, 'status', 'sent', 'session', session, 'sent_at', now, 'attempts',
    attempt, 'deadline', deadline)
  redis.call('ZADD', c[1], deadline_ms, id .. '/' .. cid)
  if f[5] ~= 'sent' then
    redis.call('HINCRBY', c[2], f[5], -1)
    redis.call('HINCRBY', c[2], 'sent', 1)
  end
  command_event(c[3], c[4], events_maxlen, id, cid, f[1], 'sent', attempt, now, nil)
  local frame = '{"type":"command","command_id":"' .. cid .. '","name":"' .. f[1] ..
    '","params":' .. f[2] .. ',"deadline":' .. deadline .. ',"timeout":' .. f[3] ..
    ',"attempt":' .. attempt .. ',"session":"' .. session .. '"}'
  if device_channel then
    redis.call(PUBLISH, device_channel, frame)
  end
  return frame
end

-- Back to waiting for the device (its session ended before it answered).
local function requeue(c, key, id, cid, created, ttl, now, events_maxlen)
  local f = redis.call('HMGET', key, 'name', 'attempts')
  redis.call('HSET', key, 'status', 'queued', 'deadline', '')
  redis.call('ZADD', c[1], ms_of(created) + ms_of(ttl), id .. '/' .. cid)
  redis.call('HINCRBY', c[2], 'sent', -1)
  redis.call('HINCRBY', c[2], 'queued', 1)
  command_event(c[3], c[4], events_maxlen, id, cid, f[1], 'queued', tonumber(f[2]) or 0, now, nil)
end

-- The final state: the command leaves the pending set for the bounded done set, its record
-- is kept for *retention* seconds, waiters are told on the device's channel. *result* is a
-- JSON document or nil; *error_json* a JSON string literal or nil. Returns the old status.
local function finish(c, key, pending_key, done_key, device_channel, id, cid, status, result,
                      error_json, now, retention, done_max, events_maxlen)
  local f = redis.call('HMGET', key, 'name', 'attempts', 'status', 'seq')
  redis.call('HSET', key, 'status', status, 'completed_at', now)
  if result then
    redis.call('HSET', key, 'result', result)
  end
  if error_json then
    redis.call('HSET', key, 'error', cjson.decode(error_json))
  end
  redis.call('EXPIRE', key, retention)
  redis.call('ZREM', pending_key, cid)
  redis.call('ZREM', c[1], id .. '/' .. cid)
  redis.call('HINCRBY', c[2], f[3], -1)
  redis.call('ZADD', done_key, f[4], cid)
  local over = redis.call('ZCARD', done_key) - done_max
  if over > 0 then
    local base = string.sub(key, 1, #key - #cid)
    for _, old in ipairs(redis.call('ZRANGE', done_key, 0, over - 1)) do
      redis.call('DEL', base .. old)
    end
    redis.call('ZREMRANGEBYRANK', done_key, 0, over - 1)
  end
  redis.call('EXPIRE', done_key, retention)
  command_event(c[3], c[4], events_maxlen, id, cid, f[1], status, tonumber(f[2]) or 0, now,
    error_json)
  redis.call(PUBLISH, device_channel, '{"type":"command_done","command_id":"' .. cid ..
    '","status":"' .. status .. '"}')
  return f[3]
end

-- When the ttl is over: `expired` if the device never got it, `timed_out` if it did and never
-- answered.
local function ttl_over(key)
  if (tonumber(redis.call('HGET', key, 'attempts')) or 0) > 0 then
    return 'timed_out', TTL_OVER
  end
  return 'expired', NEVER_SENT
end

-- Hand a session the device's pending commands, oldest first: queued ones, and those sent to
-- another session that never answered (or to this one, when a re-sync asks) while their ttl
-- lasts. One whose ttl is over is finished instead. The caller holds the session: it sends
-- the frames returned, in order (nothing is published for them).
local function claim(c, pending_key, done_key, base, device_channel, id, session, now,
                     retention, done_max, events_maxlen)
  local frames = {}
  for _, cid in ipairs(redis.call('ZRANGE', pending_key, 0, -1)) do
    local key = base .. cid
    local f = redis.call('HMGET', key, 'status', 'created_at', 'ttl')
    if not f[1] then
      redis.call('ZREM', pending_key, cid)
    elseif f[1] == 'queued' or f[1] == 'sent' then
      if ms_of(f[2]) + ms_of(f[3]) > ms_of(now) then
        frames[#frames + 1] = send_command(c, key, nil, id, cid, session, now, events_maxlen)
      elseif f[1] == 'queued' then
        local status, why = ttl_over(key)
        finish(c, key, pending_key, done_key, device_channel, id, cid, status, nil, why, now,
          retention, done_max, events_maxlen)
      end
    end
  end
  return frames
end

-- The device is deregistered: its pending commands end `canceled` (recorded, so followers
-- know), and every command record of it goes with it.
local function drop_commands(c, pending_key, done_key, base, id, now, events_maxlen)
  for _, cid in ipairs(redis.call('ZRANGE', pending_key, 0, -1)) do
    local f = redis.call('HMGET', base .. cid, 'name', 'status', 'attempts')
    if f[1] then
      redis.call('HINCRBY', c[2], f[2], -1)
      command_event(c[3], c[4], events_maxlen, id, cid, f[1], 'canceled', tonumber(f[3]) or 0,
        now, '"the device was deleted"')
      redis.call('DEL', base .. cid)
    end
    redis.call('ZREM', c[1], id .. '/' .. cid)
  end
  for _, cid in ipairs(redis.call('ZRANGE', done_key, 0, -1)) do
    redis.call('DEL', base .. cid)
  end
  redis.call('DEL', pending_key, done_key)
end
