-- Read many devices in one call: the fields asked for and when their heartbeat expires.
-- One reply for a whole page instead of two commands per device.
-- KEYS[1..n] device:state:{id}  KEYS[n+1..2n] device:heartbeat:{id} (same order)
-- ARGV[1..m] the hash fields to read
-- Returns one array per device: the field values in ARGV order, then the heartbeat's
-- PEXPIRETIME (-2: no heartbeat, offline; -1: online, no TTL; else online, and the epoch ms it
-- expires at: when it was last renewed, read the same by every reader at any moment).
local n = #KEYS / 2
local result = {}
for i = 1, n do
  local row = redis.call('HMGET', KEYS[i], unpack(ARGV))
  row[#ARGV + 1] = redis.call('PEXPIRETIME', KEYS[n + i])
  result[i] = row
end
return result
