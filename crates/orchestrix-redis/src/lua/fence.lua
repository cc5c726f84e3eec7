-- Fencing, shared by every script only the owner may run. ARGV[1] is how the caller's
-- running record starts: '1r' .. <its token> (schema version '1', status 'r', then the
-- token; see record.rs), so one comparison checks all three. Unless the value under KEYS[1]
-- starts with it, the script stops here, touches nothing, and answers what `not_running`
-- (defined before this part, see stale.lua and finished.lua) makes of the value.
--
-- Replies are integers, the cheapest reply for Redis to build: 1 applied, 0 stale (absent,
-- another owner's, no longer running, or no record at all), -1 garbled (finish.lua), 2 to 4
-- a finish of the caller's found already applied (finished.lua). The rare other Redis type
-- under the key is the one table reply: {'wrongtype', <its type>}.
local key = KEYS[1]
local value = redis.pcall('GET', key)
if type(value) ~= 'string' or string.sub(value, 1, 34) ~= ARGV[1] then
  -- pcall hands GET's WRONGTYPE error back as a table instead of aborting the script.
  if type(value) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
  return not_running(value)
end
