-- `gateway migrate`, stored layout 1 → 2, one device hash: the gateway's own fields move to
-- their short names. Only fields the gateway wrote move: a hash the classes of "How to
-- Implement Device State Management with Redis" wrote holds none of them and is left as it
-- is. Idempotent: a hash already moved has no old name left, so a run interrupted anywhere
-- and run again ends as one clean run does. A new name already present keeps its value.
-- KEYS[1] device:state:{id}
-- ARGV[1] '1' to write, '' to count only; then pairs from ARGV[2]: old name, new name
-- Returns the number of fields moved (or that would move).
local pairs_count = (#ARGV - 1) / 2
local old = {}
for i = 1, pairs_count do
  old[i] = ARGV[2 * i]
end
local values = redis.call('HMGET', KEYS[1], unpack(old))
local moves, gone, moved = {}, {}, 0
for i = 1, pairs_count do
  if values[i] then
    moved = moved + 1
    gone[#gone + 1] = old[i]
    if redis.call('HEXISTS', KEYS[1], ARGV[2 * i + 1]) == 0 then
      moves[#moves + 1] = ARGV[2 * i + 1]
      moves[#moves + 1] = values[i]
    end
  end
end
if moved > 0 and ARGV[1] == '1' then
  if #moves > 0 then
    redis.call('HSET', KEYS[1], unpack(moves))
  end
  redis.call('HDEL', KEYS[1], unpack(gone))
end
return moved
