-- A mover's claim on the due members of the delayed set (relay/delivery/delayed.py):
-- each is pushed a lease further, so a mover that dies before publishing it loses nothing.
-- An empty set empties the indexes: an entry a mover of an earlier version left there
-- cannot outlive the members.
--
-- KEYS[1]  relay:delayed                            ZSET member -> due time (s)
-- KEYS[2]  relay:delayed:received:delayed           ZSET member id -> oldest receipt
-- KEYS[3]  relay:delayed:received:identity_wait     the same, for identity waits
--
-- ARGV[1]  the most members to claim
-- ARGV[2]  the lease, in seconds
--
-- Returns {members, seconds}: the members claimed (due by Redis's clock) and, when none
-- was due, the seconds until the next one is ("-1": the set is empty).

if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return {{}, '-1'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member)
end
local next_in = -1
if #due == 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then next_in = math.max(tonumber(first[2]) - now, 0) end
end
return {due, tostring(next_in)}
