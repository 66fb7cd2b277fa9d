-- Record delivery attempts of a webhook endpoint, and move its cursor after successes, only
-- while the caller holds the endpoint's lease and no replay has moved the cursor since.
-- KEYS[1] webhook lease  KEYS[2] webhook (hash)  KEYS[3] webhook deliveries (list)
-- ARGV[1] lease token  ARGV[2] the generation the caller read  ARGV[3] new cursor ('' keeps it)
-- ARGV[4] attempts kept  ARGV[5] failing_since ('-' keeps it, '' clears it)
-- ARGV[6] last_error ('-' keeps it)  ARGV[7] status ('-' keeps it)
-- ARGV[8...] attempts (JSON), oldest first
-- Returns 1 when written, 0 when the lease is not the caller's, -1 when the cursor was
-- replayed (generation moved), -2 when the endpoint is gone.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local generation = redis.call('HGET', KEYS[2], 'generation')
if not generation then
  return -2
end
if generation ~= ARGV[2] then
  return -1
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], 'cursor', ARGV[3])
end
if #ARGV >= 8 then
  for i = 8, #ARGV do
    redis.call('LPUSH', KEYS[3], ARGV[i])
  end
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
end
if ARGV[5] ~= '-' then
  redis.call('HSET', KEYS[2], 'failing_since', ARGV[5])
end
if ARGV[6] ~= '-' then
  redis.call('HSET', KEYS[2], 'last_error', ARGV[6])
end
if ARGV[7] ~= '-' then
  redis.call('HSET', KEYS[2], 'status', ARGV[7])
end
return 1
