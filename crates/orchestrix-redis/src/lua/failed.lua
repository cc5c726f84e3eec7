-- StartRequest::may_take_over on the layouts of record.rs and durable/layout.rs (after
-- durable_layout.lua): whether `record`, the value under the key, is a failure a caller
-- that re-runs failures may replace, given its fingerprint `fp` (nil when fingerprinting is
-- off). Anything this version did not write in full is refused: garbage is reported back
-- (the caller's decoding turns it into a typed error), never freed.
local function may_take_over(record, fp)
  if string.sub(record, 1, 2) == '1F' then
    -- A durable flow's failure: re-running it starts over, its journal discarded.
    local h = durable_head(string.sub(record, 1, HEAD_LEN))
    if not h or h.status ~= 'F' or not journal_ok(record, h) then return false end
    if fp == nil or h.fp_len == nil then return true end
    return string.sub(record, HEAD_LEN + 1, HEAD_LEN + h.fp_len) == fp
  end
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
