-- release (after fence.lua): the owner gives the key back.
redis.call('DEL', KEYS[1])
return {'ok'}
