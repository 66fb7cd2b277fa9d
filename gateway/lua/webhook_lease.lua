-- Renew or release a webhook endpoint's lease, only when it is still the caller's.
-- KEYS[1] webhook lease
-- ARGV[1] lease token  ARGV[2] 'renew' or 'release'  ARGV[3] lease (ms, for renew)
-- Returns 1 when done, 0 when the lease is not (or no longer) the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return 1
