-- Fleet counts in one call, from maintained sets and counters: O(types), never O(fleet).
-- KEYS[1] devices:registered  KEYS[2] devices:online  KEYS[3] devices:types
-- KEYS[4] devices:stats:online_by_type
-- ARGV[1] the name of devices:type:{t} with t empty (keys.py's prefix; the type is appended)
-- Returns {registered, online, type, registered of type, online of type, type, ...}
local result = {redis.call('SCARD', KEYS[1]), redis.call('SCARD', KEYS[2])}
for _, device_type in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  result[#result + 1] = device_type
  result[#result + 1] = redis.call('SCARD', ARGV[1] .. device_type)
  result[#result + 1] = tonumber(redis.call('HGET', KEYS[4], device_type) or '0')
end
return result
