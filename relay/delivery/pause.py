"""The pause: while `pause_until` is ahead, no worker of the deployment sends.

Invariant: nobody is let through before `pause_until` (on Redis's clock). A 429's
Retry-After, or an outage (`outage_threshold` consecutive failed requests), sets it. After
an outage pause, one worker at a time holds the probe and sends a single request; its
success resumes everyone, its failure doubles the pause (up to `MAX_OUTAGE_PAUSE_S`), so a
long outage costs a few probes a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay import keys
from relay.state import lua

MAX_OUTAGE_PAUSE_S = 30.0
FIRST_OUTAGE_PAUSE_S = 2.0
PROBE_TTL_MS = 15_000

# KEYS: pause_until, failures, probe. ARGV: threshold, probe_ttl_ms.
# Returns {verdict, wait_ms}: 0 go, 1 wait, 2 probe (you alone may send one request).
_PERMIT = """
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

# Reports a send's outcome to the shared pause; returns the pause now in force (ms). Its
# KEYS and ARGV: relay/state/lua/pause_report.lua.
_REPORT = lua.read("pause_report")


@dataclass(frozen=True)
class Permit:
    """May this worker send now? `probe`: only one request, to test the water."""

    go: bool
    probe: bool = False
    wait_s: float = 0.0


class Pause:
    """The deployment's shared pause and outage probe (sync Redis client)."""

    def __init__(self, r: Any, allow_oom: str, *, outage_threshold: int) -> None:
        self._threshold = outage_threshold
        self._permit = r.register_script(allow_oom + _PERMIT)
        self._report = r.register_script(allow_oom + _REPORT)

    def permit(self) -> Permit:
        """Whether sending is allowed now, and if not, for how long to hold back."""
        verdict, wait_ms = self._permit(
            keys=[keys.PAUSE_UNTIL, keys.FAILURES, keys.PROBE],
            args=[self._threshold, PROBE_TTL_MS],
        )
        if int(verdict) == 1:
            return Permit(go=False, wait_s=int(wait_ms) / 1000)
        return Permit(go=True, probe=int(verdict) == 2)

    def report(self, *, successes: int, failures: int, retry_after_s: float | None) -> float:
        """Record request outcomes and a Retry-After; returns the pause now in force (s)."""
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
