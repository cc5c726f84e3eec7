-- complete / fail (after durable_layout.lua, durable_fence.lua and a line setting
-- `status` to 'C' or 'F'): ARGV[2] the tail, '+' .. result or '-' without one; ARGV[3] the
-- TTL (ms), absent to keep the record until deleted.
--
-- The journal stays where it is: the status and the tail's offset are rewritten in the
-- header, and the tail appended after the last entry. A record whose header this version
-- did not write is refused (-1), never finished into something nobody can read. A result
-- that would take the record past Redis's limit for one value (512 MiB) is left out, the
-- record finished without it: {'toolarge', <room there was>}.
local h = durable_head(head)
if not h then return -1 end
local len = redis.call('STRLEN', key)
local tail = ARGV[2]
local room = 536870912 - len - 1
local fits = #tail - 1 <= room
if not fits then tail = '-' end
redis.call('SETRANGE', key, 1, status .. string.sub(head, 3, 64) .. string.format('%08x', len))
redis.call('APPEND', key, tail)
if ARGV[3] then
  redis.call('PEXPIRE', key, ARGV[3])
else
  redis.call('PERSIST', key)
end
if not fits then return {'toolarge', room} end
return 1
