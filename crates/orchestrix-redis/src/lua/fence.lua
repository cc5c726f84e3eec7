-- Fencing, shared by every script only the owner may run: unless ARGV[1] is the token of
-- the running record under KEYS[1] (schema version '1', status 'r', the token at bytes
-- 3..34 of the string; see record.rs), the script stops here and touches nothing.
local key = KEYS[1]
local value = redis.pcall('GET', key)
if type(value) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
if not value or string.sub(value, 1, 2) ~= '1r' or string.sub(value, 3, 34) ~= ARGV[1] then
  return {'stale'}
end
