-- suspend (after durable_fence.lua): the lease lapses now, so the next start resumes the
-- run at once; the record is kept for its retention from now.
redis.call('SETRANGE', key, 34, string.format('%015d', now))
local retain = string.sub(head, 50, 64)
if retain ~= '---------------' then redis.call('PEXPIRE', key, tonumber(retain)) end
return 1
