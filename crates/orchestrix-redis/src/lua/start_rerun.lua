-- start for a caller that re-runs failures (the common case is a native SET NX GET), after
-- durable_layout.lua and failed.lua: acquire KEYS[1] if it is absent or holds a failed
-- record this version wrote in full and the caller may take over, else report the value
-- that holds it.
-- ARGV[1] the new running record (encoded), ARGV[2] lease (ms), ARGV[3] the caller's
-- fingerprint (absent when fingerprinting is off).
--
-- Expiry needs no clock here: a lapsed lease or TTL is a key Redis has already expired,
-- and Redis freezes its clock for the whole script, so what we read stays true until we write.
-- (A durable record's lease is in its value, but only its failure is ever taken over here.)
local key = KEYS[1]
local value = redis.pcall('GET', key)
if type(value) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end

if value and not may_take_over(value, ARGV[3]) then return {'record', value} end
redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
return {'acquired'}
