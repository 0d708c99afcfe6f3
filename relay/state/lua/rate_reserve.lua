-- Rate-limit slots for a lane's requests (relay/delivery/rate.py). The rate is the
-- explicit one, or the learned one if lower. Each lane has its own GCRA: while live work
-- flows (a live reservation in the last 2 s, or live messages waiting) the replay lane
-- gets `share` of the rate and live the rest; alone, a lane gets all of it, and the
-- replay lane reserves no further ahead than its alone max_wait, so that live work
-- arriving gets its part of the rate that soon. With no rate at all, replays wait while
-- live work flows.
--
-- KEYS[1]  relay:throttle:gcra          the live lane's theoretical arrival time (ms)
-- KEYS[2]  relay:throttle:gcra:replay   the replay lane's
-- KEYS[3]  relay:throttle:lane:live     flag (2 s): the live lane reserved lately
-- KEYS[4]  relay:throttle:lane:replay   flag (2 s): the replay lane reserved lately
-- KEYS[5]  relay                        the live queue (LIST)
-- KEYS[6]  relay:throttle:adaptive      HASH the learned rate (relay/delivery/learned.py)
-- KEYS[7]  relay:stats                  HASH the deployment's counters
--
-- ARGV[1]  the lane: live | replay
-- ARGV[2]  the explicit rate, requests per second (0: none)
-- ARGV[3]  how many slots are wanted
-- ARGV[4]  the longest wait for a slot, in ms
-- ARGV[5]  the replay lane's share of the rate while live work flows
-- ARGV[6]  1: the learned rate applies; 0: not
-- ARGV[7]  the first rate guessed before anything is learned
-- ARGV[8]  the replay lane's longest wait when alone, in ms
-- ARGV[9]  the stats field counting waits (ratelimit_waits)
--
-- Reserves as many of the slots as start within the longest wait; returns each reserved
-- slot's delay (ms), or {-1, wait_ms} when not even one fits.

local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local rps, share = tonumber(ARGV[2]), tonumber(ARGV[5])
if ARGV[6] == '1' then
  -- Nothing learned yet: the first guess (the cap, or ARGV[7]) until a report sets it.
  local first = rps > 0 and rps or tonumber(ARGV[7])
  local learned = tonumber(redis.call('HGET', KEYS[6], 'rate') or first)
  if learned > 0 and (rps <= 0 or learned < rps) then rps = learned end
end
local tat_key = KEYS[1]
local max_wait = tonumber(ARGV[4])
if ARGV[1] == 'live' then
  redis.call('SET', KEYS[3], '1', 'PX', 2000)
  if rps > 0 and redis.call('EXISTS', KEYS[4]) == 1 then rps = rps * (1 - share) end
else
  redis.call('SET', KEYS[4], '1', 'PX', 2000)
  tat_key = KEYS[2]
  if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('LLEN', KEYS[5]) > 0 then
    if rps <= 0 then
      redis.call('HINCRBY', KEYS[7], ARGV[9], 1)
      return {-1, 1000}
    end
    rps = rps * share
  else
    max_wait = math.min(max_wait, tonumber(ARGV[8]))
  end
end
local count = tonumber(ARGV[3])
if rps <= 0 then
  local zeros = {}
  for i = 1, count do zeros[i] = 0 end
  return zeros
end
local interval = 1000 / rps
local tat = tonumber(redis.call('GET', tat_key) or '0')
if tat < now then tat = now end
local fits = math.floor((max_wait - (tat - now)) / interval) + 1
count = math.min(count, fits)
-- A wait is counted here, in the call that decides it: at maxmemory a HINCRBY of its
-- own would be refused, and it would cost a round trip.
if count < 1 or tat > now then redis.call('HINCRBY', KEYS[7], ARGV[9], 1) end
if count < 1 then return {-1, math.ceil(tat - now)} end
local delays = {}
for i = 1, count do
  delays[i] = math.floor(tat + interval * (i - 1) - now)
end
local last = tat + interval * count
redis.call('SET', tat_key, tostring(last), 'PX', math.ceil(last - now) + 60000)
return delays
