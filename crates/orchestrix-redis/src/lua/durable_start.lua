-- start_durable (after durable_layout.lua and failed.lua): acquire KEYS[1] for a durable
-- run, take over an abandoned one with its journal, or report the record that holds it.
-- ARGV[1] '1R' .. the new token, ARGV[2] the lease (ms), ARGV[3] the retention field (15
-- digits, or 15 '-'), ARGV[4] the body of a fresh record: fingerprint length, fingerprint,
-- then the input framed as a journal item; ARGV[5] '1' when the caller re-runs failures.
--
-- Replies: {'acquired'}; {'resumed', <the record as it was>} (a takeover: the caller reads
-- the journal from it); {'durable', <header and fingerprint>[, <tail>]} for a durable record
-- that holds the key; {'record', <value>} for anything else that does (a plain record, or a
-- value this version cannot read, which the caller's decoding turns into a typed error).
local key = KEYS[1]
local head = redis.pcall('GETRANGE', key, 0, HEAD_LEN - 1)
if type(head) == 'table' then return {'wrongtype', redis.call('TYPE', key).ok} end
local now = now_ms()
local lease = tonumber(ARGV[2])
local deadline = ms15(now + lease)

local function fresh()
  local value = ARGV[1] .. deadline .. ARGV[3] .. NO_TAIL .. ARGV[4]
  if ARGV[3] == NO_RETAIN then
    redis.call('SET', key, value)
  else
    redis.call('SET', key, value, 'PX', lease + tonumber(ARGV[3]))
  end
  return {'acquired'}
end

if head == '' then
  if redis.call('EXISTS', key) == 0 then return fresh() end
  return {'record', ''}
end

local fp
local fp_len = string.sub(ARGV[4], 1, 4)
if fp_len ~= 'ffff' then fp = string.sub(ARGV[4], 5, 4 + tonumber(fp_len, 16)) end

local h = durable_head(head)
if not h then
  -- Not a durable record: a plain one (its lease, if running, is alive: Redis expires it),
  -- decided as the plain start decides; or garbage, reported.
  local value = redis.call('GET', key)
  if ARGV[5] == '1' and may_take_over(value, fp) then return fresh() end
  return {'record', value}
end
local stored = stored_fingerprint(key, h)
if stored == false then return {'record', redis.call('GET', key)} end
local agree = fp == nil or stored == nil or fp == stored

if h.status == 'R' and h.deadline <= ms15(now) and agree then
  -- Abandoned: the new owner takes it over with its journal, in place (token, lease and
  -- retention are contiguous), unless the journal is not one this version wrote.
  local value = redis.call('GET', key)
  if not journal_ok(value, h) then return {'record', value} end
  redis.call('SETRANGE', key, 2, string.sub(ARGV[1], 3) .. deadline .. ARGV[3])
  retain_for(key, lease, ARGV[3])
  return {'resumed', value}
end
if h.status == 'F' and ARGV[5] == '1' and agree then
  -- Re-run from the start, unless the failure is not one this version wrote in full.
  local value = redis.call('GET', key)
  if not journal_ok(value, h) then return {'record', value} end
  return fresh()
end
return existing(key, head, h, stored)
