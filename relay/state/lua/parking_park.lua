-- Parks the traits of an identify whose user has no account yet (relay/state/parking.py),
-- keeping the newer value per trait.
--
-- KEYS[1]  relay:parked:<user key>     HASH trait -> "<event ms>|<JSON value>"
-- KEYS[2]  relay:parking:index         ZSET user key -> expiry
-- KEYS[3]  relay:parking:traits        the number of traits parked now
-- KEYS[4]  relay:stats                 HASH the deployment's counters
-- KEYS[5]  relay:identity:<user key>   the user's identity entry
-- KEYS[6]  relay:parking:known         SET users parked after they got an account
--
-- ARGV[1]  the user key
-- ARGV[2]  when the parked traits expire (the index's score)
-- ARGV[3]  the hash's TTL, in seconds
-- ARGV[4]  the stats field counting parked traits (parked:parked)
-- ARGV[5...] per trait three: its name, event time in ms, JSON value
--
-- Returns how many traits were parked that were not before.

local added = 0
for i = 5, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if not old then added = added + 1 end
  if not old or tonumber(string.match(old, '^(%d+)|')) <= tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '|' .. ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('INCRBY', KEYS[3], added)
redis.call('HINCRBY', KEYS[4], ARGV[4], (#ARGV - 4) / 3)
-- The user got an account since the worker read the map (another batch taught it): the
-- sweep releases what is parked, as no later call of the user may come.
local entry = redis.call('GET', KEYS[5])
if entry then
  local v = cjson.decode(entry)
  if type(v[1]) == 'string' then redis.call('SADD', KEYS[6], ARGV[1]) end
end
return added
