-- Corrections to the index of durable leases (KEYS[1], a sorted set: member the record's
-- key, score a hint of its lease deadline), after `abandoned` verified entries against
-- their records. ARGV holds triples: member, the score it had when read, and the new score,
-- or '' to remove it. A member whose score changed since (a start, renew or suspend wrote
-- it meanwhile) is left alone, so a correction never undoes a newer write.
local index = KEYS[1]
local fixed = 0
for i = 1, #ARGV, 3 do
  local score = redis.call('ZSCORE', index, ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', index, ARGV[i])
    else
      redis.call('ZADD', index, ARGV[i + 2], ARGV[i])
    end
    fixed = fixed + 1
  end
end
return fixed
