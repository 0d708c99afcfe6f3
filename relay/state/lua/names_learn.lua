-- Remembers the names of one kind sent for the first time (relay/state/names.py), while
-- the set has room; counts and lists each one.
--
-- KEYS[1]  relay:names:known:<kind>    SET the names sent so far
-- KEYS[2]  relay:stats                 HASH the deployment's counters
-- KEYS[3]  relay:names:new             ZSET "kind:name" -> first sent
--
-- ARGV[1]  the kind (event, account_attribute, contact_attribute)
-- ARGV[2]  the most names the known set keeps
-- ARGV[3]  now (the new names' score)
-- ARGV[4]  how many new names are kept for listing
-- ARGV[5]  the kind's stats field (new_names:<kind>)
-- ARGV[6...] the names
--
-- Returns how many names were new.

local added = 0
for i = 6, #ARGV do
  local name = ARGV[i]
  if redis.call('SISMEMBER', KEYS[1], name) == 0 then
    if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
      redis.call('SADD', KEYS[1], name)
    end
    redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
    redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1] .. ':' .. name)
    added = added + 1
  end
end
if added > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[4]) - 1)
end
return added
