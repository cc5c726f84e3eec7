-- complete / fail (after fence.lua): ARGV[2] the final status code ('c' or 'f'), ARGV[3]
-- the TTL (ms; '0' keeps the record until deleted), ARGV[4] the result (absent when it is
-- too large to store). Version, token and fingerprint are kept as they are.
local fp_len = string.sub(value, 35, 38)
local header_end = 38
if fp_len ~= 'ffff' then
  if not string.find(fp_len, '^[0-9a-f][0-9a-f][0-9a-f][0-9a-f]$') then return {'garbled'} end
  header_end = 38 + tonumber(fp_len, 16)
end
if #value <= header_end then return {'garbled'} end
local result = '-'
if ARGV[4] then result = '+' .. ARGV[4] end
local finished = '1' .. ARGV[2] .. string.sub(value, 3, header_end) .. result
-- SET without KEEPTTL replaces the lease: PX sets the TTL, its absence means no expiry.
if ARGV[3] == '0' then
  redis.call('SET', key, finished)
else
  redis.call('SET', key, finished, 'PX', ARGV[3])
end
return {'ok'}
