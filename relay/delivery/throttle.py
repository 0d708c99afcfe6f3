"""Shared throttle state in Redis, so every worker on every host slows down together.

- A global rate limit (GCRA): each request to ChurnZero reserves a slot; slots are
  `1/rate` apart across all workers, on Redis's clock. Two lanes: replayed dead letters
  get `replay_share` of the rate while live events flow, all of it otherwise.
- A self-tuning rate (AIMD): a 429 cuts the rate, success slowly raises it; an explicit
  `rate_limit_rps` caps it.
- A pause: a 429's Retry-After, or an outage (`outage_threshold` consecutive failed
  requests) sets `pause_until`; nobody sends before it. After an outage pause, one
  worker at a time sends a single probe request; its success resumes everyone, its
  failure doubles the pause (up to `MAX_OUTAGE_PAUSE_S`), so a long outage costs a few
  probes a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay import keys
from relay.state import oom

MAX_OUTAGE_PAUSE_S = 30.0
FIRST_OUTAGE_PAUSE_S = 2.0
PROBE_TTL_MS = 15_000

# KEYS: pause_until, failures, probe. ARGV: threshold, probe_ttl_ms.
# Returns {verdict, wait_ms}: 0 go, 1 wait, 2 probe (you alone may send one request).
_GATE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < pause then return {1, pause - now} end
local failures = tonumber(redis.call('GET', KEYS[2]) or '0')
if failures >= tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[2]) then return {2, 0} end
  -- Someone else's probe is on the wire: look again shortly, not after its whole TTL.
  local ttl = redis.call('PTTL', KEYS[3])
  if ttl < 0 or ttl > 500 then ttl = 500 end
  return {1, ttl}
end
return {0, 0}
"""

# KEYS: live tat, replay tat, live flag, replay flag, live queue, adaptive state, stats.
# ARGV: lane, rps (0: none), count, max_wait_ms, replay share, adaptive (1/0), first rps,
# the replay lane's max_wait_ms when alone, the stats field counting waits.
# The rate is the explicit one, or the learned one if lower. Each lane has its own GCRA:
# while live work flows (a live reservation in the last 2 s, or live messages waiting)
# the replay lane gets `share` of the rate and live the rest; alone, a lane gets all of
# it, and the replay lane reserves no further ahead than its alone max_wait, so that live
# work arriving gets its part of the rate that soon. With no rate at all, replays wait
# while live work flows.
# Reserves as many of `count` slots as start within max_wait; returns each reserved
# slot's delay (ms), or {-1, wait_ms} when not even one fits.
_RESERVE = """
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
"""

# KEYS: pause_until, failures, probe, trips. ARGV: successes, failures, retry_after_ms,
# threshold, first_pause_ms, max_pause_ms. Returns the pause now in force (ms from now).
# An outage pause doubles per trip; failures reported while a pause is already in force
# (requests that were on the wire together) do not trip it again.
_REPORT = """
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
"""


# KEYS: adaptive state (HASH: rate, phase, cut_at, grown_at, and the 2xx counts of the
# last four seconds as ok<n>/at<n>, n = second mod 4). ARGV: successes, throttled,
# cap_rps (0: none), beta, alpha (rps per s), min_rps, first_rps, slow_start (x per s),
# first beta (the cut that ends slow start).
# The rate starts at the cap, or first_rps, and grows by slow_start per second of success
# until the first 429; from then on (AIMD) a 429 cuts it to beta x the 2xx rate of the
# last two seconds (at most once per 2 s: requests on the wire together are one
# signal), and success adds alpha per second. Returns the rate before.
_ADAPT = """
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
"""

# The self-tuning rate: a first guess of 20 requests/s growing 1.5x a second until the
# first 429 (slow start, as TCP); then a cut keeps 90 % and the rate grows back by 0.5
# requests/s per second, so near a hidden limit of 50/s a cycle lasts some 20 s.
ADAPT_FIRST_RPS = 20.0
ADAPT_SLOW_START = 1.5
ADAPT_BETA = 0.9
ADAPT_FIRST_BETA = 0.75
ADAPT_ALPHA_RPS = 0.5
ADAPT_MIN_RPS = 1.0
ADAPT_MAX_RPS = 10_000.0  # where slow start stops growing without a cap (_ADAPT's 10000)
# A 429 with a Retry-After up to this long (or none) is a rate signal: it cuts the
# learned rate instead of pausing every worker. Longer ones pause, and cut nothing.
ADAPT_PAUSE_BELOW_S = 1.0
# While live work flows, a replay task reserves slots of the replay lane's share at most
# this far ahead; past it, its events wait in the delayed set. Replays have a worker
# process of their own, so a waiting replay task holds no live message's thread, and
# waiting costs less than putting events back: each event put back is written to the
# delayed set and read again, Redis and CPU work beside live traffic (tests/bench/replay.py
# measures live p99 beside a replay).
REPLAY_MAX_WAIT_S = 1.0
# Alone, the replay lane has the whole rate and reserves at most this far ahead: live
# work arriving gets its part of the rate within that (more would let the two lanes
# together exceed the rate meanwhile).
REPLAY_ALONE_MAX_WAIT_S = 0.05
# While the rate is being learned (no explicit rate), a task reserves slots at most this
# far ahead, so a cut takes hold within about a second instead of after a task's backlog.
ADAPT_MAX_WAIT_S = 1.0


@dataclass(frozen=True)
class Gate:
    """May this worker send now? `probe`: only one request, to test the water."""

    go: bool
    probe: bool = False
    wait_s: float = 0.0


class Throttle:
    """The shared throttle of one deployment (sync Redis client)."""

    def __init__(
        self, r: Any, *, rate_limit_rps: float, outage_threshold: int,
        replay_share: float = 0.2, adaptive: bool = True,
    ) -> None:  # fmt: skip
        self._redis = r
        self._rps = rate_limit_rps
        self._threshold = outage_threshold
        self._share = replay_share
        self._adaptive = adaptive
        # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.state.oom).
        allow_oom = oom.header(r)
        self._adapt = r.register_script(allow_oom + _ADAPT)
        self._gate = r.register_script(allow_oom + _GATE)
        self._reserve = r.register_script(allow_oom + _RESERVE)
        self._report = r.register_script(allow_oom + _REPORT)

    def gate(self) -> Gate:
        """Whether sending is allowed now, and if not, for how long to hold back."""
        verdict, wait_ms = self._gate(
            keys=[keys.PAUSE_UNTIL, keys.FAILURES, keys.PROBE],
            args=[self._threshold, PROBE_TTL_MS],
        )
        if int(verdict) == 1:
            return Gate(go=False, wait_s=int(wait_ms) / 1000)
        return Gate(go=True, probe=int(verdict) == 2)

    def reserve(self, count: int, max_wait_s: float, lane: str = "live") -> list[float] | float:
        """Delays (s) of up to `count` rate-limit slots of this lane (`live` or `replay`)
        starting within max_wait_s (fewer when the limit is busy), or the wait (s) before
        even one would start; a wait is counted in the stats (`ratelimit_waits`)."""
        if count == 0:
            return []
        result = self._reserve(
            keys=[keys.RATE_LIMIT, keys.RATE_LIMIT_REPLAY, keys.LANE_LIVE, keys.LANE_REPLAY,
                  keys.QUEUE, keys.ADAPTIVE_RATE, keys.STATS],
            args=[lane, self._rps, count, max_wait_s * 1000, self._share, int(self._adaptive),
                  ADAPT_FIRST_RPS, REPLAY_ALONE_MAX_WAIT_S * 1000, keys.Stat.RATELIMIT_WAITS],
        )  # fmt: skip
        if int(result[0]) == -1:
            return int(result[1]) / 1000
        return [max(int(d), 0) / 1000 for d in result]

    def report(
        self, *, successes: int, failures: int, retry_after_s: float | None, throttled: int = 0
    ) -> float:
        """Record a batch's request outcomes (`throttled`: how many were 429s); returns
        the pause now in force (s)."""
        if not successes and not failures and not retry_after_s:
            return 0.0
        signal = throttled and (retry_after_s or 0) <= ADAPT_PAUSE_BELOW_S
        if self._adaptive and (successes or signal):
            self._adapt(
                keys=[keys.ADAPTIVE_RATE],
                args=[successes, throttled if signal else 0, self._rps, ADAPT_BETA,
                      ADAPT_ALPHA_RPS, ADAPT_MIN_RPS, ADAPT_FIRST_RPS, ADAPT_SLOW_START,
                      ADAPT_FIRST_BETA],
            )  # fmt: skip
            if signal:
                retry_after_s = None  # the learned rate was just cut: that is the slowing down
            if not successes and not failures and not retry_after_s:
                return 0.0
        pause_ms = self._report(
            keys=[keys.PAUSE_UNTIL, keys.FAILURES, keys.PROBE, keys.TRIPS],
            args=[
                successes,
                failures,
                int((retry_after_s or 0) * 1000),
                self._threshold,
                int(FIRST_OUTAGE_PAUSE_S * 1000),
                int(MAX_OUTAGE_PAUSE_S * 1000),
            ],
        )
        return int(pause_ms) / 1000
