-- release (after fence.lua): the owner gives the key back.
redis.call('DEL', key)
-- Wakes the key's waiters (see finish.lua).
redis.pcall('SPUBLISH', key, '')
return 1
