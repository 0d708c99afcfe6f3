-- Drops the parked traits of some users (a delete), or of those whose time is up (the
-- sweep) (relay/state/parking.py).
--
-- KEYS[1]  relay:parking:index         ZSET user key -> expiry
-- KEYS[2]  relay:parking:traits        the number of traits parked now
-- KEYS[3]  relay:stats                 HASH the deployment's counters
--
-- ARGV[1]  the parked-traits prefix (relay:parked:)
-- ARGV[2]  the stats field counting what is dropped (parked:deleted or parked:expired)
-- ARGV[3]  with no user given, the most users to drop
-- ARGV[4...] the user keys (none: the users due by Redis's clock)
--
-- Returns how many traits were dropped.

local users = {}
for i = 4, #ARGV do table.insert(users, ARGV[i]) end
if #users == 0 then
  local t = redis.call('TIME')
  users = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t[1], 'LIMIT', 0, ARGV[3])
end
local dropped = 0
for _, user in ipairs(users) do
  local n = redis.call('HLEN', ARGV[1] .. user)
  if n > 0 then redis.call('DEL', ARGV[1] .. user) end
  redis.call('ZREM', KEYS[1], user)
  dropped = dropped + n
end
-- Nothing dropped writes nothing: an idle sweep leaves Redis (and its AOF) alone.
if dropped > 0 then
  redis.call('DECRBY', KEYS[2], dropped)
  redis.call('HINCRBY', KEYS[3], ARGV[2], dropped)
end
return dropped
