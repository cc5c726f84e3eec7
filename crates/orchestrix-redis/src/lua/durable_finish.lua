-- complete / fail (after durable_layout.lua, the line setting `status` ('C' or 'F'), `tail`
-- ('+' .. result, or '-' without one) and `ttl` (ms; nil to keep the record until
-- deleted), durable_finished.lua and durable_fence.lua).
--
-- The journal stays where it is: the tail is appended after the last entry, then the
-- status and the tail's offset are rewritten in the header. APPEND comes first: it is the
-- one write that can be refused (memory, Redis's value limit), and a script stopped by a
-- refused write has then written nothing. A record whose header this version did not
-- write is refused (-1), never finished into something nobody can read. A result that
-- would take the record past Redis's limit for one value (512 MiB) is left out, the record
-- finished without it: {'toolarge', <room there was>}.
local h = durable_head(head)
if not h then return -1 end
local len = redis.call('STRLEN', key)
local room = MAX_VALUE - len - 1
local fits = #tail - 1 <= room
if fits then
  redis.call('APPEND', key, tail)
else
  redis.call('APPEND', key, '-')
end
redis.call('SETRANGE', key, 1, status .. string.sub(head, 3, 64) .. string.format('%08x', len))
if ttl then
  redis.call('PEXPIRE', key, ttl)
else
  redis.call('PERSIST', key)
end
if not fits then return {'toolarge', room} end
return 1
