-- append (after durable_fence.lua): ARGV[2] the entry framed as a journal item (8 hex
-- digits of length, then the bytes), ARGV[3] the largest the record may grow to. The entry
-- is appended in place, never by copying the record: an append costs the same whatever
-- the journal's length.
local size = redis.call('STRLEN', key) + #ARGV[2]
if size > tonumber(ARGV[3]) then return {'toolarge', size} end
redis.call('APPEND', key, ARGV[2])
return 1
