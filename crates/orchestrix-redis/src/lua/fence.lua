-- Fencing, shared by every script only the owner may run: unless ARGV[1] is the token of
-- the running record under KEYS[1], the script stops here and touches nothing.
local function refusal(key, token)
  local owner = redis.pcall('HMGET', key, 'status', 'token')
  if owner.err then return {'wrongtype', redis.call('TYPE', key).ok} end
  if owner[1] ~= 'running' or owner[2] ~= token then return {'stale'} end
  return nil
end
local refused = refusal(KEYS[1], ARGV[1])
if refused then return refused end
