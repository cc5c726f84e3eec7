-- release (after fence.lua): the owner gives the key back.
redis.call('DEL', key)
redis.call('SPUBLISH', key, '')
return 1
