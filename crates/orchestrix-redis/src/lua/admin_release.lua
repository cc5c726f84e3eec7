-- The record admin's release (after durable_layout.lua): frees the running record under
-- KEYS[1] without its owner's token. A plain running record is deleted; a durable one has
-- its lease lapse now, as suspend does, its journal kept for the run that resumes it.
-- Nothing is written on a value this version cannot read; a finished record is reported
-- as such, and the client decodes it before it says so.
--
-- Replies: 0 absent, 1 deleted, 2 the durable lease lapsed (now, or already),
-- {'finished', <status letter>}, -1 not a record this version reads,
-- {'wrongtype', <its type>}.
local key = KEYS[1]
local head = redis.pcall('GETRANGE', key, 0, HEAD_LEN - 1)
if type(head) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
if head == '' then
  if redis.call('EXISTS', key) == 0 then return 0 end
  return -1
end
local status = string.sub(head, 2, 2)
if string.sub(head, 1, 1) ~= '1' then return -1 end
if status == 'r' then
  -- A plain running record: its version, status and token are all a fenced write checks.
  -- It is deleted only when it reads as one: version, token, fingerprint length, and the
  -- lone '-' of no result at its end.
  if not string.find(string.sub(head, 3, 34), '^[0-9a-f]+$') then return -1 end
  local fp_len, n = string.sub(head, 35, 38), 0
  if fp_len ~= 'ffff' then
    if not string.find(fp_len, '^[0-9a-f]+$') then return -1 end
    n = tonumber(fp_len, 16)
  end
  if redis.call('STRLEN', key) ~= 39 + n then return -1 end
  if redis.call('GETRANGE', key, 38 + n, 38 + n) ~= '-' then return -1 end
  redis.call('DEL', key)
  return 1
end
if status == 'c' or status == 'f' then return {'finished', status} end
local h = durable_head(head)
if not h then return -1 end
if h.status ~= 'R' then return {'finished', h.status} end
local now = now_ms()
if h.deadline > ms15(now) then
  redis.call('SETRANGE', key, 34, ms15(now))
  if h.retain ~= NO_RETAIN then redis.call('PEXPIRE', key, tonumber(h.retain)) end
end
return 2
