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
from relay.state import lua

# Reserves rate-limit slots for a lane's requests (see its header). Its KEYS and ARGV:
# relay/state/lua/rate_reserve.lua.
_RESERVE = lua.read("rate_reserve")

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
