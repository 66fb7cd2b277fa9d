-- Compare-and-set one JSON section of the device hash (desired, reported or metadata).
-- The merge is computed by shadow.py from what the caller read; this script writes it only if
-- the section is still exactly what was read (any writer, the seed's classes included, moves
-- its SHA-1), so no concurrent change is ever lost. A desired change is published on the
-- device's command channel in the seed's format, with the new shadow version.
-- KEYS[1] device:state:{id}  KEYS[2] device:history:{id}  KEYS[3] devices:events
-- KEYS[4] device:{id}:commands (channel)
-- ARGV[1] id  ARGV[2] section: desired | reported | metadata  ARGV[3] SHA-1 of the value read
-- ARGV[4] expected shadow version ('' for any)  ARGV[5] new JSON  ARGV[6] new timestamps JSON
-- ARGV[7] now  ARGV[8] history maxlen  ARGV[9] events maxlen
-- ARGV[10] '1' when the caller found the merge changes nothing but formatting ('' otherwise)
-- Returns {1, version} written, {0, version} unchanged, {-1} unknown device,
-- {-2, version} expected version is stale, {-3, version} the section moved: read and retry.
local id, section, now = ARGV[1], ARGV[2], ARGV[7]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1}
end
local field = section == 'metadata' and 'metadata' or section .. '_state'
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= version then
  return {-2, version}
end
local current = redis.call('HGET', KEYS[1], field) or ''
if redis.sha1hex(current) ~= ARGV[3] then
  return {-3, version}
end
-- the SHA check above proves the section is what the caller compared: trust its verdict
if current == ARGV[5] or ARGV[10] == '1' then
  return {0, version}
end
if section == 'metadata' then
  redis.call('HSET', KEYS[1], field, ARGV[5])
  stream_add(KEYS[2], KEYS[3], ARGV[8], ARGV[9], '{"type":"metadata","device_id":"' .. id ..
    '","timestamp":' .. now .. ',"metadata":' .. ARGV[5])
  return {1, version}
end
redis.call('HSET', KEYS[1], field, ARGV[5], section .. '_meta', ARGV[6])
version = redis.call('HINCRBY', KEYS[1], 'version', 1)
stream_add(KEYS[2], KEYS[3], ARGV[8], ARGV[9], '{"type":"state","device_id":"' .. id ..
  '","section":"' .. section .. '","version":' .. version .. ',"timestamp":' .. now ..
  ',"state":' .. ARGV[5])
if section == 'desired' then
  redis.call('PUBLISH', KEYS[4], '{"type":"state_update","desired_state":' .. ARGV[5] ..
    ',"timestamp":' .. now .. ',"version":' .. version .. '}')
end
return {1, version}
