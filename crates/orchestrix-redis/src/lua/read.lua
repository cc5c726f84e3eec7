-- get: the record under KEYS[1], as its hash fields.
local key = KEYS[1]
local fields = redis.pcall('HGETALL', key)
if fields.err then return {'wrongtype', redis.call('TYPE', key).ok} end
if #fields == 0 then return {'absent'} end
return {'record', fields}
