-- Fleet counts in one call, from the indexes the device list walks: O(types), never O(fleet).
-- Counting the same indexes the list pages through keeps the two in agreement: a device is
-- counted exactly when it is listed (devices written by other programs once adopted).
-- KEYS[1] devices:index  KEYS[2] devices:index:online  KEYS[3] devices:types
-- KEYS[4] devices:stats:online_by_type
-- ARGV[1] the name of devices:index:type:{t} with t empty (keys.py's prefix; the type is appended)
-- Returns {registered, online, type, registered of type, online of type, type, ...}
local result = {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
for _, device_type in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  result[#result + 1] = device_type
  result[#result + 1] = redis.call('ZCARD', ARGV[1] .. device_type)
  result[#result + 1] = tonumber(redis.call('HGET', KEYS[4], device_type) or '0')
end
return result
