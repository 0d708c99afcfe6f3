"""The two-lane rate limit (GCRA): request slots shared by every worker, on Redis's clock.

Invariant: within a lane, reserved slots are at least `1/rate` apart across all workers;
while live work flows the replay lane gets `replay_share` of the rate and live the rest
(together never more than the rate), and alone a lane gets all of it. The rate is the
explicit `rate_limit_rps`, or the learned one (relay.delivery.learned) if lower.
"""

from __future__ import annotations

from typing import Any

from relay import keys
from relay.delivery.learned import ADAPT_FIRST_RPS

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


class LaneRate:
    """The deployment's rate limit, in a live and a replay lane (sync Redis client)."""

    def __init__(
        self, r: Any, allow_oom: str, *, rate_limit_rps: float, replay_share: float,
        adaptive: bool,
    ) -> None:  # fmt: skip
        self._rps = rate_limit_rps
        self._share = replay_share
        self._adaptive = adaptive
        self._reserve = r.register_script(allow_oom + _RESERVE)

    def reserve(self, count: int, max_wait_s: float, lane: str = "live") -> list[float] | float:
        """Delays (s) of up to `count` slots of this lane (`live` or `replay`) starting
        within max_wait_s (fewer when the limit is busy), or the wait (s) before even one
        would start; a wait is counted in the stats (`ratelimit_waits`)."""
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
