-- Read many devices in one call: the fields asked for and whether each is online.
-- One reply for a whole page instead of two commands per device.
-- KEYS[1..n] device:state:{id}  KEYS[n+1..2n] device:heartbeat:{id} (same order)
-- ARGV[1..m] the hash fields to read
-- Returns one array per device: the field values in ARGV order, then 1 if online else 0.
local n = #KEYS / 2
local result = {}
for i = 1, n do
  local row = redis.call('HMGET', KEYS[i], unpack(ARGV))
  row[#ARGV + 1] = redis.call('EXISTS', KEYS[n + i])
  result[i] = row
end
return result
