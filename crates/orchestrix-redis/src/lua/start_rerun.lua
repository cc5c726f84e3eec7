-- start for a caller that re-runs failures (the common case is a native SET NX GET):
-- acquire KEYS[1] if it is absent or holds a failed record this version wrote in full and
-- the caller may take over, else report the value that holds it.
-- ARGV[1] the new running record (encoded), ARGV[2] lease (ms), ARGV[3] the caller's
-- fingerprint (absent when fingerprinting is off).
--
-- Expiry needs no clock here: a lapsed lease or TTL is a key Redis has already expired,
-- and Redis freezes its clock for the whole script, so what we read stays true until we write.
local key = KEYS[1]
local value = redis.pcall('GET', key)
if type(value) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end

-- StartRequest::may_take_over on the layout of record.rs, refusing anything this version did
-- not write in full: garbage is reported back (the caller's decoding turns it into a typed
-- error), never freed.
local function may_take_over(record, fp)
  if string.sub(record, 1, 2) ~= '1f' then return false end
  if not string.find(string.sub(record, 3, 34), '^' .. string.rep('[0-9a-f]', 32) .. '$') then
    return false
  end
  local fp_len = string.sub(record, 35, 38)
  local fp_end = 38
  if fp_len ~= 'ffff' then
    if not string.find(fp_len, '^[0-9a-f][0-9a-f][0-9a-f][0-9a-f]$') then return false end
    fp_end = 38 + tonumber(fp_len, 16)
  end
  local flag = string.sub(record, fp_end + 1, fp_end + 1)
  if not (flag == '+' or (flag == '-' and #record == fp_end + 1)) then return false end
  if fp == nil or fp_len == 'ffff' then return true end
  return string.sub(record, 39, fp_end) == fp
end

if value and not may_take_over(value, ARGV[3]) then return {'record', value} end
redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
return {'acquired'}
