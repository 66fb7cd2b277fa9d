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

-- The id member(s) of an event: the Node.js classes read `deviceId`.
local function id_json(id)
  if NODE_EVENTS then
    return '"device_id":"' .. id .. '","deviceId":"' .. id .. '"'
  end
  return '"device_id":"' .. id .. '"'
end

local function stream_add(history_key, events_key, history_maxlen, events_maxlen, body)
  if history_key then
    redis.call('XADD', history_key, 'MAXLEN', '~', history_maxlen, '*', 'event', body .. '}')
  end
  return redis.call('XADD', events_key, 'MAXLEN', '~', events_maxlen, '*', 'event', body .. '}')
end

-- Bump the presence version, record the transition in both streams, publish it once.
local function presence_transition(state_key, history_key, events_key, channel, id, status, now,
                                   reason, history_maxlen, events_maxlen)
  local version = redis.call('HINCRBY', state_key, 'presence_version', 1)
  local body = '{"type":"presence",' .. id_json(id) .. ',"status":"' .. status ..
    '","timestamp":' .. now .. ',"version":' .. version .. ',"reason":"' .. reason .. '"'
  local stream_id = stream_add(history_key, events_key, history_maxlen, events_maxlen, body)
  redis.call(PUBLISH, channel, body .. ',"stream_id":"' .. stream_id .. '"}')
  return version
end

-- Take a device out of every online index; publish `offline` once if any index held it.
-- Returns the new presence version, or 0 when the device was already offline.
local function go_offline(state_key, history_key, online_key, index_online_key, online_seen_key,
                          by_type_key, events_key, channel, id, now, reason, history_maxlen,
                          events_maxlen)
  local in_set = redis.call('SREM', online_key, id)
  local in_index = redis.call('ZREM', index_online_key, id)
  redis.call('ZREM', online_seen_key, id)
  if in_index == 1 then
    local device_type = redis.call('HGET', state_key, F_TYPE)
    if device_type then
      redis.call('HINCRBY', by_type_key, device_type, -1)
    end
  end
  if redis.call('EXISTS', state_key) == 0 then
    return 0
  end
  redis.call('HSET', state_key, F_STATUS, 'offline')
  redis.call('HDEL', state_key, 'linger_reason')
  if in_set == 1 or in_index == 1 then
    return presence_transition(state_key, history_key, events_key, channel, id, 'offline', now,
      reason, history_maxlen, events_maxlen)
  end
  return 0
end

-- Put a device in every online index (idempotent; the per-type count moves only with the index).
local function mark_online(state_key, online_key, index_online_key, online_seen_key, seen_key,
                           by_type_key, id, seen_at)
  redis.call('HSET', state_key, F_STATUS, 'online', F_SEEN, stored_time(seen_at))
  redis.call('SADD', online_key, id)
  if redis.call('ZADD', index_online_key, 0, id) == 1 then
    local device_type = redis.call('HGET', state_key, F_TYPE)
    if device_type then
      redis.call('HINCRBY', by_type_key, device_type, 1)
    end
  end
  redis.call('ZADD', online_seen_key, seen_at, id)
  redis.call('ZADD', seen_key, seen_at, id)
end

local function kick(control_channel, id, session, code, reason)
  redis.call(PUBLISH, control_channel, '{"op":"kick","device_id":"' .. id .. '","session":"' ..
    session .. '","code":' .. code .. ',"reason":"' .. reason .. '"}')
end
