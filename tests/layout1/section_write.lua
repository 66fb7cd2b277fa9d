-- Compare-and-set one JSON section of the device hash (desired, reported or metadata).
-- The merge is computed by shadow.py from what the caller read; this script writes it only if
-- the section is still exactly what was read (any writer, the seed's classes included, moves
-- its SHA-1), so no concurrent change is ever lost. A desired change is published on the
-- device's command channel in the seed's format, with the new shadow version.
-- Versions: a desired change bumps `version` and `desired_version`, a reported one `version`
-- and `reported_version`; metadata moves none. `desired_sha` keeps the hash of the desired
-- section as the gateway last wrote it: when the caller found the section written by another
-- program since (ARGV[14]), that write is counted first (versions bumped, leaves stamped,
-- recorded with `"external":true`; it was already published by its writer), then the
-- preconditions are checked against the versions it left.
-- KEYS[1] device:state:{id}  KEYS[2] device:history:{id}  KEYS[3] devices:events
-- KEYS[4] device:{id}:commands (channel)
-- ARGV[1] id  ARGV[2] section: desired | reported | metadata  ARGV[3] SHA-1 of the value read
-- ARGV[4] expected shadow version ('' for any)  ARGV[5] expected section version ('' for any)
-- ARGV[6] new JSON  ARGV[7] SHA-1 of the new JSON  ARGV[8] new timestamps JSON  ARGV[9] now
-- ARGV[10] history maxlen  ARGV[11] events maxlen
-- ARGV[12] '1' when the caller found the merge changes nothing but formatting ('' otherwise)
-- ARGV[13] `desired_sha` as read ('' when absent)
-- ARGV[14] '1' when the caller found the section as read written by another program
-- ARGV[15] the timestamps that write alone leaves (stamped whole)
-- ARGV[16] the section as read, as the caller decoded and re-encoded it (for the record)
-- Returns {code, version, desired_version, reported_version[, stale precondition]}: code 1
-- written, 0 unchanged, -1 unknown device, -2 a precondition is stale (its name follows:
-- 'version' or 'desired_version'), -3 the section moved: read and retry.
local id, section, now = ARGV[1], ARGV[2], ARGV[9]
if redis.call('HEXISTS', KEYS[1], F_ID) == 0 then
  return {-1, 0, 0, 0}
end
local field = ({desired = F_DESIRED, reported = F_REPORTED})[section] or F_METADATA
local current = redis.call('HGET', KEYS[1], field) or ''
if redis.sha1hex(current) ~= ARGV[3] then
  return {-3, 0, 0, 0}
end
local desired = section == 'desired'
if desired and (redis.call('HGET', KEYS[1], 'desired_sha') or '') ~= ARGV[13] then
  return {-3, 0, 0, 0}
end

local function versions()
  local v = redis.call('HMGET', KEYS[1], 'version', 'desired_version', 'reported_version')
  return tonumber(v[1] or '0') or 0, tonumber(v[2] or '0') or 0, tonumber(v[3] or '0') or 0
end

local function record_state(version, body, external)
  record(KEYS[2], KEYS[3], tonumber(ARGV[10]), ARGV[11], 'state', id, ',"section":"' .. section ..
    '","version":' .. version .. ',"timestamp":' .. now .. (external and ',"external":true' or '') ..
    ',"state":' .. body,
    '"' .. string.sub(section, 1, 1) .. '",' .. version .. ',' .. body .. (external and ',1' or ''))
end

if desired and ARGV[14] == '1' then
  local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HINCRBY', KEYS[1], 'desired_version', 1)
  redis.call('HSET', KEYS[1], 'desired_meta', ARGV[15], 'desired_sha', short_sha(ARGV[3]))
  record_state(version, ARGV[16], true)
end

local version, desired_version, reported_version = versions()
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= version then
  return {-2, version, desired_version, reported_version, 'version'}
end
local section_version = section == 'reported' and reported_version or desired_version
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= section_version then
  return {-2, version, desired_version, reported_version, section .. '_version'}
end
-- the SHA checks above prove the section is what the caller compared: trust its verdict
if current == ARGV[6] or ARGV[12] == '1' then
  if desired and ARGV[13] == '' then
    redis.call('HSET', KEYS[1], 'desired_sha', short_sha(ARGV[3]))
  end
  return {0, version, desired_version, reported_version}
end
if section == 'metadata' then
  redis.call('HSET', KEYS[1], field, ARGV[6])
  record(KEYS[2], KEYS[3], tonumber(ARGV[10]), ARGV[11], 'metadata', id, ',"timestamp":' .. now ..
    ',"metadata":' .. ARGV[6], ARGV[6])
  return {1, version, desired_version, reported_version}
end
redis.call('HSET', KEYS[1], field, ARGV[6], section .. '_meta', ARGV[8])
version = redis.call('HINCRBY', KEYS[1], 'version', 1)
if desired then
  desired_version = redis.call('HINCRBY', KEYS[1], 'desired_version', 1)
  redis.call('HSET', KEYS[1], 'desired_sha', short_sha(ARGV[7]))
else
  reported_version = redis.call('HINCRBY', KEYS[1], 'reported_version', 1)
end
record_state(version, ARGV[6], false)
if desired then
  redis.call(PUBLISH, KEYS[4], '{"type":"state_update","desired_state":' .. ARGV[6] ..
    ',"timestamp":' .. now .. ',"version":' .. version .. '}')
end
return {1, version, desired_version, reported_version}
