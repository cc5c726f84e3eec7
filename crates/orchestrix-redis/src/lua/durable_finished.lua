-- complete / fail (after durable_layout.lua and the line setting `status`, `tail` and
-- `ttl`; before durable_fence.lua): what a finish answers when the value under the key is
-- not the caller's running record.
--
-- An earlier attempt of this very finish may have been applied, with its reply lost or an
-- error reported after it: the caller retried, or fell back to finishing without the
-- result. So a record the caller's token finished with this status is recognised:
--   3  it is exactly what this write makes (nothing to do);
--   5  it was finished without a result, and this write carries one (which is not stored:
--      a finished record is never rewritten), or {'toolarge', room} when the result could
--      never have fitted, as the first attempt answered;
--   4  it was finished with a result, and this write carries none (the result is stored).
-- Anything else, a different result included, is stale: 0.
local function not_owned(head)
  if string.sub(head, 1, 2) ~= '1' .. status or string.sub(head, 3, 34) ~= string.sub(ARGV[1], 3) then
    return 0
  end
  local h = durable_head(head)
  if not h then return 0 end
  local stored = redis.call('GETRANGE', KEYS[1], h.tail_at, -1)
  if stored == tail then return 3 end
  if stored == '-' then
    local room = MAX_VALUE - h.tail_at - 1
    if #tail - 1 > room then return {'toolarge', room} end
    return 5
  end
  if tail == '-' and string.sub(stored, 1, 1) == '+' then return 4 end
  return 0
end
