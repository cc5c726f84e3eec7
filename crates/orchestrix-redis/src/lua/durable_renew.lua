-- renew (after durable_fence.lua): ARGV[2] the new lease (ms) from now. The deadline is
-- rewritten in place; the key's expiry follows (lease, then retention).
local lease = tonumber(ARGV[2])
redis.call('SETRANGE', key, 34, string.format('%015d', now + lease))
local retain = string.sub(head, 50, 64)
if retain ~= '---------------' then redis.call('PEXPIRE', key, lease + tonumber(retain)) end
return 1
