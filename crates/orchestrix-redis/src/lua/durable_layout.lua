-- The durable record's layout (see durable/layout.rs), for the durable scripts that decide
-- on a whole header or a whole journal. Offsets below are 1-based, as in Lua.
--
--   1       '1' (schema version)      2      'R' running, 'C' completed, 'F' failed
--   3-34    the owner's token          35-49  lease deadline, ms on Redis's clock, 15 digits
--   50-64   retention ms, 15 digits, or 15 '-' (kept until deleted)
--   65-72   where the tail begins (0-based), 8 hex digits; '--------' while running
--   73-76   fingerprint length, 4 hex digits, 'ffff' none    77-  fingerprint, then the journal
local HEAD_LEN = 76
local NO_RETAIN = '---------------'
local NO_TAIL = '--------'
-- Redis's limit for one string value (proto-max-bulk-len's default, 512 MiB).
local MAX_VALUE = 536870912

-- Redis's clock, in ms, and as the 15-digit field a deadline is written in. Fixed-width
-- digits compare as numbers do, so deadlines are compared as strings.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local function ms15(n) return string.format('%015d', n) end

-- The header's fields if `head` (the value's first 76 bytes) is one this version writes,
-- else nil: nothing is decided on a header that does not parse.
local function durable_head(head)
  if #head ~= HEAD_LEN or string.sub(head, 1, 1) ~= '1' then return nil end
  local status = string.sub(head, 2, 2)
  if status ~= 'R' and status ~= 'C' and status ~= 'F' then return nil end
  if not string.find(string.sub(head, 3, 34), '^[0-9a-f]+$') then return nil end
  local deadline = string.sub(head, 35, 49)
  if not string.find(deadline, '^[0-9]+$') then return nil end
  local retain = string.sub(head, 50, 64)
  if retain ~= NO_RETAIN and not string.find(retain, '^[0-9]+$') then return nil end
  local tail = string.sub(head, 65, 72)
  local tail_at
  if status == 'R' then
    if tail ~= NO_TAIL then return nil end
  else
    if not string.find(tail, '^[0-9a-f]+$') then return nil end
    tail_at = tonumber(tail, 16)
  end
  local fp_len = string.sub(head, 73, 76)
  local fp_n
  if fp_len ~= 'ffff' then
    if not string.find(fp_len, '^[0-9a-f]+$') then return nil end
    fp_n = tonumber(fp_len, 16)
  end
  return {status = status, deadline = deadline, retain = retain, tail_at = tail_at, fp_len = fp_n}
end

-- The stored fingerprint (nil: none), or false when the value is too short to hold it.
local function stored_fingerprint(key, h)
  if not h.fp_len then return nil end
  if h.fp_len == 0 then return '' end
  local fp = redis.call('GETRANGE', key, HEAD_LEN, HEAD_LEN + h.fp_len - 1)
  if #fp ~= h.fp_len then return false end
  return fp
end

-- Whether `value`'s journal is framed as layout.rs writes it: from the end of the
-- fingerprint, the input and then each entry as 8 hex digits of length and the bytes,
-- up to the end of the value (running) or up to a tail of '+' and the result, or a lone '-'
-- (finished). Only the rare operations that rewrite a record or hand its journal to a new
-- owner walk it: a takeover and a redrive.
local function journal_ok(value, h)
  local pos = HEAD_LEN + (h.fp_len or 0)
  local stop = h.tail_at or #value
  if stop - pos < 8 or stop > #value then return false end
  while pos < stop do
    local len = string.sub(value, pos + 1, pos + 8)
    if #len ~= 8 or not string.find(len, '^[0-9a-f]+$') then return false end
    pos = pos + 8 + tonumber(len, 16)
  end
  if pos ~= stop then return false end
  if not h.tail_at then return true end
  local flag = string.sub(value, stop + 1, stop + 1)
  return flag == '+' or (flag == '-' and #value == stop + 1)
end

-- The reply showing a durable record that holds the key: its header and fingerprint, and
-- for a finished record its tail (the result), never the journal between them.
local function existing(key, head, h, fp)
  if h.status == 'R' then return {'durable', head .. (fp or '')} end
  return {'durable', head .. (fp or ''), redis.call('GETRANGE', key, h.tail_at, -1)}
end

-- Sets the key's expiry for a running record: its lease and then its retention, or none.
local function retain_for(key, lease, retain)
  if retain == NO_RETAIN then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIRE', key, lease + tonumber(retain))
  end
end
