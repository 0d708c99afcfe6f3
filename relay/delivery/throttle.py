"""Shared throttle state in Redis, so every worker on every host slows down together.

`Throttle` is what delivery calls; it joins three mechanisms, each with its invariant in
its own module:
- relay.delivery.pause: a pause (Retry-After, outage) and the outage probe;
- relay.delivery.rate: the two-lane rate limit (GCRA), live and replay;
- relay.delivery.learned: the self-tuning rate (AIMD), capped by `rate_limit_rps`.
"""

from __future__ import annotations

from typing import Any

from relay.delivery.learned import (
    ADAPT_ALPHA_RPS,
    ADAPT_BETA,
    ADAPT_FIRST_BETA,
    ADAPT_FIRST_RPS,
    ADAPT_MAX_RPS,
    ADAPT_MAX_WAIT_S,
    ADAPT_MIN_RPS,
    ADAPT_PAUSE_BELOW_S,
    ADAPT_SLOW_START,
    LearnedRate,
)
from relay.delivery.pause import (
    FIRST_OUTAGE_PAUSE_S,
    MAX_OUTAGE_PAUSE_S,
    PROBE_TTL_MS,
    Pause,
    Permit,
)
from relay.delivery.rate import REPLAY_ALONE_MAX_WAIT_S, REPLAY_MAX_WAIT_S, LaneRate
from relay.state import oom

__all__ = [
    "ADAPT_ALPHA_RPS",
    "ADAPT_BETA",
    "ADAPT_FIRST_BETA",
    "ADAPT_FIRST_RPS",
    "ADAPT_MAX_RPS",
    "ADAPT_MAX_WAIT_S",
    "ADAPT_MIN_RPS",
    "ADAPT_PAUSE_BELOW_S",
    "ADAPT_SLOW_START",
    "FIRST_OUTAGE_PAUSE_S",
    "MAX_OUTAGE_PAUSE_S",
    "PROBE_TTL_MS",
    "REPLAY_ALONE_MAX_WAIT_S",
    "REPLAY_MAX_WAIT_S",
    "Permit",
    "Throttle",
]


class Throttle:
    """The shared throttle of one deployment (sync Redis client)."""

    def __init__(
        self, r: Any, *, rate_limit_rps: float, outage_threshold: int,
        replay_share: float = 0.2, adaptive: bool = True,
    ) -> None:  # fmt: skip
        self._adaptive = adaptive
        # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.state.oom).
        allow_oom = oom.header(r)
        self._learned = LearnedRate(r, allow_oom, cap_rps=rate_limit_rps)
        self._pause = Pause(r, allow_oom, outage_threshold=outage_threshold)
        self._rate = LaneRate(
            r, allow_oom, rate_limit_rps=rate_limit_rps, replay_share=replay_share,
            adaptive=adaptive,
        )  # fmt: skip

    def permit(self) -> Permit:
        """Whether sending is allowed now, and if not, for how long to hold back."""
        return self._pause.permit()

    def reserve(self, count: int, max_wait_s: float, lane: str = "live") -> list[float] | float:
        """Delays (s) of up to `count` rate-limit slots of this lane (`live` or `replay`)
        starting within max_wait_s (fewer when the limit is busy), or the wait (s) before
        even one would start; a wait is counted in the stats (`ratelimit_waits`)."""
        return self._rate.reserve(count, max_wait_s, lane)

    def report(
        self, *, successes: int, failures: int, retry_after_s: float | None, throttled: int = 0
    ) -> float:
        """Record a batch's request outcomes (`throttled`: how many were 429s); returns
        the pause now in force (s)."""
        if not successes and not failures and not retry_after_s:
            return 0.0
        signal = LearnedRate.is_signal(throttled, retry_after_s)
        if self._adaptive and (successes or signal):
            self._learned.report(successes=successes, throttled=throttled if signal else 0)
            if signal:
                retry_after_s = None  # the learned rate was just cut: that is the slowing down
            if not successes and not failures and not retry_after_s:
                return 0.0
        return self._pause.report(
            successes=successes, failures=failures, retry_after_s=retry_after_s
        )
