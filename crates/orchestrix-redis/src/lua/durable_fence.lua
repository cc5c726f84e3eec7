-- Fencing of the durable owner's writes (append, renew, suspend, release, finish), after
-- the definition of `not_owned` (durable_stale.lua, or durable_finished.lua for a finish).
-- ARGV[1] is how the caller's record starts: '1R' .. <its token>. Unless the value under
-- KEYS[1] starts with it and its lease deadline is still ahead on Redis's clock, the script
-- stops here and touches nothing.
--
-- Replies are integers on the common paths: 1 applied, 0 stale (absent, another owner's,
-- finished, lease lapsed), 2 a *plain* running record that carries the caller's token (only
-- a token issued by an earlier version of this crate can be both: the client then sends
-- the plain script), -1 garbled (finish), 3 to 5 a finish of the caller's found already
-- applied (durable_finished.lua). Another Redis type: {'wrongtype', <its type>}.
local key = KEYS[1]
local head = redis.pcall('GETRANGE', key, 0, 75)
if type(head) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
if string.sub(head, 1, 34) ~= ARGV[1] then
  if string.sub(head, 1, 34) == '1r' .. string.sub(ARGV[1], 3) then return 2 end
  return not_owned(head)
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if string.sub(head, 35, 49) <= string.format('%015d', now) then return 0 end
