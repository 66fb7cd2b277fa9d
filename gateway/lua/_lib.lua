-- Helpers shared by every script: scripts.py puts this file in front of each one, after the
-- layout's prelude (F_* field names, PUBLISH, MILLIS, NODE_EVENTS).
-- Event JSON is built by concatenation: ids and types are restricted to [A-Za-z0-9._-]
-- (keys.py) and reasons are the gateway's own words, so nothing here needs escaping.

-- A time for the device hash in the layout's unit (epoch seconds, or milliseconds for the
-- Node.js classes' fields), from epoch seconds as text.
local function stored_time(seconds)
  if MILLIS then
    return string.format('%.0f', tonumber(seconds) * 1000)
  end
  return seconds
end

-- Epoch seconds from a time as the device hash holds it.
local function time_of(stored)
  local value = tonumber(stored or '0') or 0
  if MILLIS then
    return value / 1000
  end
  return value
end

-- The last seen (epoch seconds as text) a renewal of a lapsed heartbeat marks the device online
-- with: the frame's own when it moves the last-seen index (*seen_at*); else (its step was
-- written already) the time stored, not *now*: a frame re-asserted late, after Redis lost the
-- key, would otherwise put `last_seen` at the moment of the write, however long ago it came.
local function renewal_seen(state_key, seen_at, now)
  if seen_at ~= '' then
    return seen_at
  end
  local stored = redis.call('HGET', state_key, F_SEEN)
  if time_of(stored) <= 0 then
    return now
  end
  if MILLIS then
    return string.format('%.3f', time_of(stored))
  end
  return stored
end

-- Before a session's heartbeat is cut short or removed: `last_seen` moved to the heartbeat's
-- last renewal (its expiry less the TTL, *ttl* ms), which can be up to a second past the stored
-- value (it moves once a second), so a device's last seen never steps back when it goes
-- offline. Only within two seconds of the stored value and never past *now* (a heartbeat
-- another program wrote with another TTL says nothing reliable).
local function settle_last_seen(state_key, heartbeat_key, ttl, now)
  local expires = redis.call('PEXPIRETIME', heartbeat_key)
  if expires <= 0 then
    return
  end
  local renewed = (expires - ttl) / 1000
  local stored = time_of(redis.call('HGET', state_key, F_SEEN))
  if renewed > stored and renewed <= stored + 2 and renewed <= tonumber(now) then
    redis.call('HSET', state_key, F_SEEN, stored_time(string.format('%.3f', renewed)))
  end
end

-- `desired_sha` as stored: the first 64 bits of the SHA-1 (hex) tell a foreign write apart,
-- in a quarter of the bytes.
local function short_sha(hex)
  return string.sub(hex, 1, 16)
end

-- The id member(s) of an event: the Node.js classes read `deviceId`.
local function id_json(id)
  if NODE_EVENTS then
    return '"device_id":"' .. id .. '","deviceId":"' .. id .. '"'
  end
  return '"device_id":"' .. id .. '"'
end

-- Record an event: appended to the partition's fleet log (a bounded stream), and, when a
-- history key is given, pushed on the device's history (a list, newest first, bounded by
-- *history_cap*, a number: trimmed back to it once it is an eighth over, so a push costs no
-- trim). *rest* is the log event's members after its type and device id, each with its
-- leading comma; *tail* the same event for the history, as the rest of a compact array
-- `[log id, kind letter, ...]` (store.py spells it out again; its key names the device and
-- its log id the time). A batch passes no *events_maxlen* and trims the log once at its end.
-- Returns the log's id.
local KIND_LETTER = {presence = 'p', state = 's', metadata = 'm'}
local function record(history_key, events_key, history_cap, events_maxlen, kind, id, rest, tail)
  local body = '{"type":"' .. kind .. '",' .. id_json(id) .. rest .. '}'
  local stream_id
  if events_maxlen then
    stream_id = redis.call('XADD', events_key, 'MAXLEN', '~', events_maxlen, '*', 'event', body)
  else
    stream_id = redis.call('XADD', events_key, '*', 'event', body)
  end
  if history_key then
    local length = redis.call('LPUSH', history_key,
      '["' .. stream_id .. '","' .. KIND_LETTER[kind] .. '",' .. tail .. ']')
    if length > history_cap + math.floor(history_cap / 8) then
      redis.call('LTRIM', history_key, 0, history_cap - 1)
    end
  end
  return stream_id
end

-- Bump the presence version, record the transition, publish it once.
local function presence_transition(state_key, history_key, events_key, channel, id, status, now,
                                   reason, history_maxlen, events_maxlen)
  local version = redis.call('HINCRBY', state_key, G_PRESENCE_VERSION, 1)
  local rest = ',"status":"' .. status .. '","timestamp":' .. now .. ',"version":' .. version ..
    ',"reason":"' .. reason .. '"'
  local stream_id = record(history_key, events_key, history_maxlen, events_maxlen, 'presence',
    id, rest, '"' .. status .. '",' .. version .. ',"' .. reason .. '"')
  redis.call(PUBLISH, channel, '{"type":"presence",' .. id_json(id) .. rest .. ',"stream_id":"' ..
    stream_id .. '"}')
  return version
end

-- Take a device out of every online index (into the offline last-seen index); publish
-- `offline` once if any index held it. Returns the new presence version, or 0 when the
-- device was already offline.
-- *offline* is {online set, online id index, online last-seen index, offline last-seen
-- index, online count by type, fleet log, presence channel}: the offline scripts' head.
local function go_offline(state_key, history_key, offline, id, now, reason, history_maxlen,
                          events_maxlen)
  local in_set = SEED_SETS and redis.call('SREM', offline[1], id) or 0
  local in_index = redis.call('ZREM', offline[2], id)
  redis.call('ZREM', offline[3], id)
  local fields = redis.call('HMGET', state_key, F_ID, F_TYPE, F_SEEN)
  if in_index == 1 and fields[2] then
    redis.call('HINCRBY', offline[5], fields[2], -1)
  end
  if redis.call('EXISTS', state_key) == 0 then
    return 0
  end
  if fields[1] then  -- a device of this layout (another layout's hash is only announced)
    redis.call('ZADD', offline[4], time_of(fields[3]), id)
  end
  redis.call('HSET', state_key, F_STATUS, 'offline')
  redis.call('HDEL', state_key, G_LINGER)
  if in_set == 1 or in_index == 1 then
    return presence_transition(state_key, history_key, offline[6], offline[7], id, 'offline', now,
      reason, history_maxlen, events_maxlen)
  end
  return 0
end

-- Put a device in every online index (idempotent; the per-type count moves only with the index).
local function mark_online(state_key, online_key, index_online_key, online_seen_key,
                           offline_seen_key, by_type_key, id, seen_at)
  redis.call('HSET', state_key, F_STATUS, 'online', F_SEEN, stored_time(seen_at))
  if SEED_SETS then
    redis.call('SADD', online_key, id)
  end
  if redis.call('ZADD', index_online_key, 0, id) == 1 then
    local device_type = redis.call('HGET', state_key, F_TYPE)
    if device_type then
      redis.call('HINCRBY', by_type_key, device_type, 1)
    end
  end
  redis.call('ZADD', online_seen_key, seen_at, id)
  redis.call('ZREM', offline_seen_key, id)
end

local function kick(control_channel, id, session, code, reason)
  redis.call(PUBLISH, control_channel, '{"op":"kick","device_id":"' .. id .. '","session":"' ..
    session .. '","code":' .. code .. ',"reason":"' .. reason .. '"}')
end
