-- release (after fence.lua): the owner gives the key back.
redis.call('DEL', key)
return 1
