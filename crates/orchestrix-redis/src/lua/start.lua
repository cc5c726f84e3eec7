-- start: acquire KEYS[1] for a new owner, or report the live record that holds it.
-- ARGV[1] new token, ARGV[2] lease (ms), ARGV[3] '1' to re-run failed records,
-- ARGV[4] schema version, ARGV[5] fingerprint (absent when fingerprinting is off).
--
-- Expiry needs no clock here: a lapsed lease or TTL is a key Redis has already expired,
-- and Redis freezes its clock for the whole script, so what we read stays true until we write.
local key = KEYS[1]
local fields = redis.pcall('HGETALL', key)
if fields.err then return {'wrongtype', redis.call('TYPE', key).ok} end
if #fields > 0 then
  local record = {}
  for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
  local fp = ARGV[5]
  -- StartRequest::may_take_over, refusing anything this version did not write in full:
  -- garbage is reported back (the caller's decoding turns it into a typed error), never freed.
  local may_take_over = ARGV[3] == '1'
    and record.v == ARGV[4]
    and record.status == 'failed'
    and record.token ~= nil and #record.token == 32 and not string.find(record.token, '%X')
    and (fp == nil or record.fp == nil or record.fp == fp)
  if not may_take_over then return {'record', fields} end
  redis.call('DEL', key)
end
if ARGV[5] then
  redis.call('HSET', key, 'v', ARGV[4], 'status', 'running', 'token', ARGV[1], 'fp', ARGV[5])
else
  redis.call('HSET', key, 'v', ARGV[4], 'status', 'running', 'token', ARGV[1])
end
redis.call('PEXPIRE', key, ARGV[2])
return {'acquired'}
