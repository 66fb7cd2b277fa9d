-- One tick of MQTT messages from many devices. A message carries no session: it renews
-- whichever MQTT session is current (the one the device's last status `online` took, `mqtt:`
-- and the device's session), and never a WebSocket session. A reported document is written
-- only over the one it was merged onto (compare-and-set on `reported_version`): messages of
-- one device handled by several gateway processes never overwrite each other's patches; a
-- refused write returns the current document, and the caller merges again at the next tick.
-- KEYS[1] devices:online  KEYS[2] devices:index:online  KEYS[3] devices:online:seen
-- KEYS[4] devices:offline:seen  KEYS[5] devices:stats:online_by_type  KEYS[6] devices:events
-- KEYS[7] devices:presence (channel)
-- then for each device i (from 0): KEYS[8+3i] device:state:{id}  KEYS[9+3i] device:heartbeat:{id}
--   KEYS[10+3i] device:history:{id}
-- ARGV[1] now  ARGV[2] heartbeat TTL ms  ARGV[3] history maxlen  ARGV[4] events maxlen
-- then 5 per device: id, seen at (epoch s), the reported_version the document was merged
--   onto ('' for no document: a bare heartbeat; '?' to read the current one), reported JSON,
--   reported_meta JSON
-- Returns 5 per device: code, shadow version, reported_version, and on code -2 the current
-- reported and reported_meta ('' otherwise). Codes: 1 renewed (and written), 2 renewed and
-- back online (`resumed`), -1 no MQTT session is current (nothing written), 0 unknown device,
-- -2 renewed but the document not written (it was merged onto an older one, or '?').
local now, ttl, history_cap, events_maxlen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local call = redis.call
local result = {}
local recorded = false
for i = 0, (#KEYS - 7) / 3 - 1 do
  local state_key, heartbeat_key, history_key = KEYS[8 + 3 * i], KEYS[9 + 3 * i], KEYS[10 + 3 * i]
  local a = 5 + 5 * i
  local id, seen_at, expected, reported, meta = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
    ARGV[a + 4]
  local current = call('HMGET', state_key, G_SESSION, F_REPORTED, G_VERSION, G_REPORTED_VERSION,
    G_REPORTED_META)
  local code, version, reported_version = 1, tonumber(current[3]) or 0, tonumber(current[4]) or 0
  local back_reported, back_meta = '', ''
  if not current[1] then
    code = 0
  elseif string.sub(current[1], 1, 5) ~= 'mqtt:' then
    code = -1
  else
    if call('PEXPIRE', heartbeat_key, ttl) == 0 then
      call('SET', heartbeat_key, '1', 'PX', ttl)
      if not call('ZSCORE', KEYS[2], id) then
        code = 2
      end
      mark_online(state_key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], id, seen_at)
      if code == 2 then
        presence_transition(state_key, history_key, KEYS[6], KEYS[7], id, 'online', now,
          'resumed', history_cap, events_maxlen)
      end
    else
      call('HSET', state_key, F_SEEN, stored_time(seen_at))
      call('ZADD', KEYS[3], seen_at, id)
    end
    if expected ~= '' then
      if expected ~= tostring(reported_version) then
        code = -2
        back_reported, back_meta = current[2] or '{}', current[5] or '{}'
      elseif reported ~= current[2] then
        version = version + 1
        reported_version = reported_version + 1
        call('HSET', state_key, F_REPORTED, reported, G_REPORTED_META, meta, G_VERSION, version,
          G_REPORTED_VERSION, reported_version)
        recorded = true
        record(history_key, KEYS[6], history_cap, nil, 'state', id,
          ',"section":"reported","version":' .. version .. ',"timestamp":' .. now ..
          ',"state":' .. reported, '"r",' .. version .. ',' .. reported)
      end
    end
  end
  result[#result + 1] = code
  result[#result + 1] = version
  result[#result + 1] = reported_version
  result[#result + 1] = back_reported
  result[#result + 1] = back_meta
end
if recorded then
  call('XTRIM', KEYS[6], 'MAXLEN', '~', events_maxlen)
end
return result
