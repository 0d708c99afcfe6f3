-- A delete (relay/state/identity.py): forgets a user and every key aliased to it (their
-- identity entries, alias links, attribute clocks) and leaves a tombstone for each, so
-- events received before the delete are dropped; their tracks waiting for identity come
-- due now, to be dropped by the tombstone.
--
-- KEYS[1]  relay:delayed      ZSET of the delayed set (its members come due now)
--
-- ARGV[1]  the identity prefix (relay:identity:)
-- ARGV[2]  the alias prefix (relay:alias:)
-- ARGV[3]  the aliased prefix (relay:aliased:): SET per user key of the keys aliased to it
-- ARGV[4]  the waiting prefix (relay:waiting:): SET per user key of its delayed members
-- ARGV[5]  the deleted prefix (relay:deleted:): the tombstones
-- ARGV[6]  the attribute-clock prefix (relay:attrclock:)
-- ARGV[7]  the user key (u:<userId> or a:<anonymousId>)
-- ARGV[8]  when the delete was received (unix time)
-- ARGV[9]  the tombstones' TTL, in seconds
--
-- Returns how many keys were forgotten (the user and its aliases).

local user = ARGV[7]
local forgotten = redis.call('SMEMBERS', ARGV[3] .. user)
table.insert(forgotten, user)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, key in ipairs(forgotten) do
  local tomb = ARGV[5] .. key
  local old = tonumber(redis.call('GET', tomb) or '0')
  redis.call('SET', tomb, math.max(old, tonumber(ARGV[8])), 'EX', ARGV[9])
  local entry = redis.call('GET', ARGV[1] .. key)
  if entry then
    -- The contact's attribute clock (relay.delivery.attribute_clock) is the user's too.
    local v = cjson.decode(entry)
    local contact = v[2]
    if type(contact) ~= 'string' and string.sub(key, 1, 2) == 'u:' then
      contact = string.sub(key, 3)
    end
    if type(v[1]) == 'string' and type(contact) == 'string' then
      redis.call('DEL', ARGV[6] .. 'c:' .. string.len(v[1]) .. ':' .. v[1] .. ':' .. contact)
    end
  end
  redis.call('DEL', ARGV[1] .. key, ARGV[2] .. key, ARGV[3] .. key)
  for _, member in ipairs(redis.call('SMEMBERS', ARGV[4] .. key)) do
    redis.call('ZADD', KEYS[1], 'XX', 'LT', now, member)
  end
  redis.call('DEL', ARGV[4] .. key)
end
return #forgotten
