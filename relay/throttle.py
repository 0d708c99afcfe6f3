"""Shared throttle state in Redis, so every worker on every host slows down together.

- A global rate limit (GCRA): each request to ChurnZero reserves a slot; slots are
  `1/rate` apart across all workers, on Redis's clock.
- A pause: a 429's Retry-After, or an outage (`outage_threshold` consecutive failed
  requests) sets `pause_until`; nobody sends before it. After an outage pause, one
  worker at a time sends a single probe request; its success resumes everyone, its
  failure doubles the pause (up to `MAX_OUTAGE_PAUSE_S`), so a long outage costs a few
  probes a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay import keys, oom

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

# KEYS: gcra tat. ARGV: interval_ms, count, max_wait_ms.
# Reserves as many of `count` slots as start within max_wait; returns each reserved
# slot's delay (ms), or {-1, wait_ms} when not even one fits.
_RESERVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local fits = math.floor((tonumber(ARGV[3]) - (tat - now)) / interval) + 1
local count = math.min(tonumber(ARGV[2]), fits)
if count < 1 then return {-1, math.ceil(tat - now)} end
local delays = {}
for i = 1, count do
  delays[i] = math.floor(tat + interval * (i - 1) - now)
end
local last = tat + interval * count
redis.call('SET', KEYS[1], tostring(last), 'PX', math.ceil(last - now) + 60000)
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


@dataclass(frozen=True)
class Gate:
    """May this worker send now? `probe`: only one request, to test the water."""

    go: bool
    probe: bool = False
    wait_s: float = 0.0


class Throttle:
    """The shared throttle of one deployment (sync Redis client)."""

    def __init__(self, r: Any, *, rate_limit_rps: float, outage_threshold: int) -> None:
        self._redis = r
        self._rps = rate_limit_rps
        self._threshold = outage_threshold
        # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.oom).
        allow_oom = oom.header(r)
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

    def reserve(self, count: int, max_wait_s: float) -> list[float] | float:
        """Delays (s) of up to `count` rate-limit slots starting within max_wait_s (fewer
        when the limit is busy), or the wait (s) before even one would start."""
        if self._rps <= 0 or count == 0:
            return [0.0] * count
        result = self._reserve(
            keys=[keys.RATE_LIMIT], args=[1000.0 / self._rps, count, max_wait_s * 1000]
        )
        if int(result[0]) == -1:
            return int(result[1]) / 1000
        return [max(int(d), 0) / 1000 for d in result]

    def report(self, *, successes: int, failures: int, retry_after_s: float | None) -> float:
        """Record a batch's request outcomes; returns the pause now in force (s)."""
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

    def release_probe(self) -> None:
        """Give up a probe slot that was not used."""
        self._redis.delete(keys.PROBE)
