-- A send's outcome reported to the shared pause (relay/delivery/pause.py). An outage pause
-- doubles per trip; failures reported while a pause is already in force (requests that
-- were on the wire together) do not trip it again; a success ends the outage.
--
-- KEYS[1]  relay:throttle:pause_until   no sending before this (unix ms)
-- KEYS[2]  relay:throttle:failures      consecutive failures
-- KEYS[3]  relay:throttle:probe         the probe's lock
-- KEYS[4]  relay:throttle:trips         how often the outage pause has doubled
--
-- ARGV[1]  successes
-- ARGV[2]  failures
-- ARGV[3]  ChurnZero's Retry-After, in ms (0: none)
-- ARGV[4]  the failures that trip an outage pause
-- ARGV[5]  the first outage pause, in ms
-- ARGV[6]  the longest outage pause, in ms
--
-- Returns the pause now in force, in ms from now (0: none).

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ok, bad, ra = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if ra > 0 and now + ra > pause then
  pause = now + ra
  redis.call('SET', KEYS[1], pause, 'PX', ra + 1000)
end
if bad > 0 and ok == 0 then
  local failures = redis.call('INCRBY', KEYS[2], bad)
  redis.call('EXPIRE', KEYS[2], 3600)
  if failures >= tonumber(ARGV[4]) and now >= pause then
    local trips = redis.call('INCR', KEYS[4])
    redis.call('EXPIRE', KEYS[4], 3600)
    local wait = math.min(tonumber(ARGV[5]) * (2 ^ math.min(trips - 1, 10)), tonumber(ARGV[6]))
    pause = now + wait
    redis.call('SET', KEYS[1], pause, 'PX', math.ceil(wait) + 1000)
  end
  redis.call('DEL', KEYS[3])
elseif ok > 0 then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
end
if pause > now then return pause - now end
return 0
