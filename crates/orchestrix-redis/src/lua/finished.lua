-- complete / fail (before fence.lua, after the line setting `status`, `tail` and `ttl`):
-- what a finish answers when the value under the key is not the caller's running record.
--
-- An earlier attempt of this very finish may have been applied, with its reply lost or an
-- error reported after it: the caller retried, or fell back to finishing without the
-- result. So a record the caller's token finished with this status is recognised:
--   2  it is exactly what this write makes (nothing to do);
--   3  it was finished without a result, and this write carries one (which is not stored:
--      a finished record is never rewritten);
--   4  it was finished with a result, and this write carries none (the result is stored).
-- Anything else, a different result included, is stale: 0.
local function not_running(value)
  if type(value) ~= 'string' or string.sub(value, 1, 2) ~= '1' .. status
      or string.sub(value, 3, 34) ~= string.sub(ARGV[1], 3) then
    return 0
  end
  local fp_len = string.sub(value, 35, 38)
  local fp_end = 38
  if fp_len ~= 'ffff' then
    local n = tonumber(fp_len, 16)
    if not n then return 0 end
    fp_end = 38 + n
  end
  -- Lengths first: the tail can be large, and most mismatches differ in length.
  if #value - fp_end == #tail and string.sub(value, fp_end + 1) == tail then return 2 end
  if #value == fp_end + 1 and string.sub(value, -1) == '-' then return 3 end
  if tail == '-' then return 4 end
  return 0
end
