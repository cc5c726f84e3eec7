-- release (after durable_fence.lua): the owner gives the key back, journal and all.
redis.call('DEL', key)
return 1
