-- One page of ids from a lexicographic index, optionally kept only if (in) or unless (out)
-- they are in a second index. Work is bounded by ARGV[3] ids examined, never by the fleet:
-- a sparse filter returns a short page and a cursor to go on from.
-- KEYS[1] index to walk (zset, score 0)  KEYS[2] filter index (zset; ignored for mode 'all')
-- ARGV[1] start: '-' or '(' .. last id seen  ARGV[2] limit  ARGV[3] budget  ARGV[4] all|in|out
-- Returns {next cursor ('' at the end of the index), ids examined, id, id, ...}
local start, limit, budget, mode = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local result = {'', 0}
local found, examined, last = 0, 0, nil
while found < limit and examined < budget do
  local want = math.min(budget - examined, mode == 'all' and (limit - found) or 512)
  local chunk = redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, want)
  if #chunk == 0 then
    result[2] = examined
    return result
  end
  for _, id in ipairs(chunk) do
    examined = examined + 1
    last = id
    local keep = mode == 'all'
    if not keep then
      local member = redis.call('ZSCORE', KEYS[2], id) ~= false
      keep = (mode == 'in') == member
    end
    if keep then
      found = found + 1
      result[#result + 1] = id
      if found == limit then
        break
      end
    end
  end
  start = '(' .. last
end
result[1] = last or ''
result[2] = examined
return result
