-- complete / fail, after fence.lua and a line setting `status` ('c' or 'f', a literal, not
-- an argument: every argument costs Redis a Lua string), `tail` (the finished record's
-- tail: '+' .. result, or '-' without the result) and `ttl` (ms; nil to keep the record
-- until deleted).
--
-- Only a running record exactly as record.rs writes it is finished: its length field
-- spells the length of what lies between the header and the closing '-' (no result) flag.
-- Anything else that carries the caller's token was not written by this store: it is
-- refused, never turned into a finished record nobody can read.
local fp_len = string.sub(value, 35, 38)
local room = #value - 39
local well_formed
if fp_len == 'ffff' then
  well_formed = room == 0
else
  -- The exact spelling record.rs writes: tonumber(fp_len, 16) would also take a '0x'
  -- prefix, signs, spaces and capitals, which decoding refuses.
  well_formed = fp_len == string.format('%04x', room)
end
if not well_formed or string.sub(value, -1) ~= '-' then return -1 end
-- Version, token and fingerprint are kept as they are; the status and the tail change.
local finished = '1' .. status .. string.sub(value, 3, -2) .. tail
-- SET without KEEPTTL replaces the lease: PX sets the TTL, its absence means no expiry.
if ttl then
  redis.call('SET', key, finished, 'PX', ttl)
else
  redis.call('SET', key, finished)
end
-- Wakes the waiters of the key (wakeups.rs), on the key's shard; no subscriber, no cost
-- beyond a lookup. pcall: a user the ACLs do not let publish there still finishes (its
-- waiters fall back to polling); an error here would come after the write.
redis.pcall('SPUBLISH', key, '')
return 1
