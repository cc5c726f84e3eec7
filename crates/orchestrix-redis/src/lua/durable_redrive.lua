-- redrive (after durable_layout.lua): re-open the failed durable record under KEYS[1].
-- ARGV[1] '1R' .. the new token, ARGV[2] the lease (ms), ARGV[3] the retention field.
-- The failure's tail is cut off and the journal kept: {'redriven', <the record as it
-- was>}. Anything else is shown as start_durable shows it, or {'absent'}.
local key = KEYS[1]
local head = redis.pcall('GETRANGE', key, 0, HEAD_LEN - 1)
if type(head) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
if head == '' then
  if redis.call('EXISTS', key) == 0 then return {'absent'} end
  return {'record', ''}
end
local h = durable_head(head)
if not h then return {'record', redis.call('GET', key)} end
if h.status ~= 'F' then
  local stored = stored_fingerprint(key, h)
  if stored == false then return {'record', redis.call('GET', key)} end
  return existing(key, head, h, stored)
end
local value = redis.call('GET', key)
if not journal_ok(value, h) then return {'record', value} end
local lease = tonumber(ARGV[2])
local running = ARGV[1] .. ms15(now_ms() + lease) .. ARGV[3] .. NO_TAIL
  .. string.sub(value, HEAD_LEN - 3, h.tail_at)
if ARGV[3] == NO_RETAIN then
  redis.call('SET', key, running)
else
  redis.call('SET', key, running, 'PX', lease + tonumber(ARGV[3]))
end
return {'redriven', value}
