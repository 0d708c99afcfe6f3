"""The learned rate (AIMD): what ChurnZero takes, found from its 429s.

Invariant: the learned rate stays between `ADAPT_MIN_RPS` and the explicit
`rate_limit_rps` (when one is set); requests on the wire together are one signal, so it is
cut at most once per two seconds. A 429 cuts it, success slowly raises it.
"""

from __future__ import annotations

from typing import Any

from relay import keys
from relay.state import lua

# Grows or cuts the learned rate from a send's 2xx and 429 counts; returns the rate
# before. Its KEYS and ARGV: relay/state/lua/learned_adapt.lua.
_ADAPT = lua.read("learned_adapt")

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
# While the rate is being learned (no explicit rate), a task reserves slots at most this
# far ahead, so a cut takes hold within about a second instead of after a task's backlog.
ADAPT_MAX_WAIT_S = 1.0


class LearnedRate:
    """The deployment's learned rate, moved by request outcomes (sync Redis client)."""

    def __init__(self, r: Any, allow_oom: str, *, cap_rps: float) -> None:
        self._cap = cap_rps
        self._adapt = r.register_script(allow_oom + _ADAPT)

    @staticmethod
    def is_signal(throttled: int, retry_after_s: float | None) -> bool:
        """Whether 429s are a rate signal (cut the rate) rather than a pause."""
        return bool(throttled) and (retry_after_s or 0) <= ADAPT_PAUSE_BELOW_S

    def report(self, *, successes: int, throttled: int) -> None:
        """Grow the rate by `successes`, or cut it for `throttled` 429s."""
        self._adapt(
            keys=[keys.ADAPTIVE_RATE],
            args=[successes, throttled, self._cap, ADAPT_BETA, ADAPT_ALPHA_RPS,
                  ADAPT_MIN_RPS, ADAPT_FIRST_RPS, ADAPT_SLOW_START, ADAPT_FIRST_BETA],
        )  # fmt: skip
