-- complete / fail (after fence.lua): ARGV[2] final status, ARGV[3] TTL (ms, '0' keeps the
-- record until deleted), ARGV[4] the result (absent when it is too large to store).
if ARGV[4] then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'result', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'status', ARGV[2])
end
if ARGV[3] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {'ok'}
