-- The learned rate (relay/delivery/learned.py). It starts at the cap, or the first rate,
-- and grows by slow_start per second of success until the first 429; from then on (AIMD)
-- a 429 cuts it to beta x the 2xx rate of the last two seconds (at most once per 2 s:
-- requests on the wire together are one signal), and success adds alpha per second.
--
-- KEYS[1]  relay:throttle:adaptive   HASH rate, phase (slow | avoid), cut_at, grown_at,
--                                    and the 2xx counts of the last four seconds as
--                                    ok<n>/at<n> (n = second mod 4)
--
-- ARGV[1]  successes (2xx)
-- ARGV[2]  throttled (429s)
-- ARGV[3]  the cap, requests per second (0: none)
-- ARGV[4]  beta, the cut's factor
-- ARGV[5]  alpha, the growth in requests per second per second
-- ARGV[6]  the lowest rate
-- ARGV[7]  the first rate, with no cap
-- ARGV[8]  slow start's growth factor per second
-- ARGV[9]  the first cut's factor (the cut that ends slow start)
--
-- Returns the rate before.

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local sec = tonumber(t[1])
local ok, throttled, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'rate', 'phase', 'cut_at', 'grown_at')
local rate = tonumber(st[1] or '0')
if rate <= 0 then
  rate = cap > 0 and cap or tonumber(ARGV[7])
  st[2] = cap > 0 and 'avoid' or 'slow'
  st[4] = tostring(now)
end
local cut_at, grown_at = tonumber(st[3] or '0'), tonumber(st[4] or '0')
local slot = sec % 4
if ok > 0 then
  if tonumber(redis.call('HGET', KEYS[1], 'at' .. slot) or '0') ~= sec then
    redis.call('HSET', KEYS[1], 'at' .. slot, sec, 'ok' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[1], 'ok' .. slot, ok)
end
local new, phase = rate, st[2] or 'slow'
if throttled > 0 then
  if now - cut_at >= 2000 then
    local seen = 0
    for back = 1, 2 do
      local s = (sec - back) % 4
      if tonumber(redis.call('HGET', KEYS[1], 'at' .. s) or '0') == sec - back then
        seen = seen + tonumber(redis.call('HGET', KEYS[1], 'ok' .. s) or '0')
      end
    end
    -- What ChurnZero accepted lately (2xx per second over two seconds: reports arrive in
    -- bursts), or the rate itself if lower.
    local base = rate
    if seen > 0 and seen / 2 < rate then base = seen / 2 end
    -- Leaving slow start, the 2xx count still holds the burst ChurnZero's bucket let
    -- through: cut deeper once (ARGV[9]) so the first cut lands under the limit.
    local beta = phase == 'slow' and tonumber(ARGV[9]) or tonumber(ARGV[4])
    new = math.max(tonumber(ARGV[6]), beta * base)
    phase, cut_at, grown_at = 'avoid', now, now
  end
elseif ok > 0 then
  -- At most a second's growth per report: an idle spell is no evidence of room.
  local dt = math.min(math.max(now - grown_at, 0) / 1000, 1)
  if phase == 'slow' then
    new = math.min(rate * tonumber(ARGV[8]) ^ dt, 10000)
  else
    new = rate + tonumber(ARGV[5]) * dt
  end
  grown_at = now
end
if cap > 0 and new > cap then new = cap end
redis.call('HSET', KEYS[1], 'rate', tostring(new), 'phase', phase, 'cut_at', cut_at,
           'grown_at', grown_at)
redis.call('EXPIRE', KEYS[1], 86400)
return tostring(rate)
