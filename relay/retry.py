"""Retry policy, decided in one place: what is retried, after how long, and until when.

Outcomes of one request to ChurnZero::

    success      2xx with ChurnZero's image
    retryable    408, 429, 5xx, timeout, connection error  -> delayed retry
    misconfigured 3xx (never followed), 2xx without an image -> every worker pauses,
                 the events are retried (the URL is wrong, or a proxy answers for it)
    permanent    any other status (4xx)                    -> dead letter "rejected"

Pure functions, no I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

from relay.reasons import Deferral


class Kind(Enum):
    """What a request's outcome means for its events."""

    SUCCESS = "success"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Outcome:
    """One request's result: status (None when no answer came), Retry-After, excerpt."""

    status: int | None
    retry_after_s: float | None = None
    excerpt: str = ""
    error: str | None = None  # timeout / connection error, when there was no answer
    # Set when the answer cannot have come from ChurnZero's /i: what came instead.
    misconfigured: str | None = None
    # Set when the host could not be reached at all: dns, tls, refused, connect_timeout.
    unreachable: str | None = None

    @property
    def kind(self) -> Kind:
        """Success, retryable or permanent."""
        if self.misconfigured is not None:
            return Kind.RETRYABLE  # nothing reached ChurnZero: keep the events
        return classify(self.status)

    @property
    def label(self) -> str:
        """A low-cardinality name for metrics: 2xx, 429, 5xx, timeout, misconfigured..."""
        if self.misconfigured is not None:
            return Deferral.MISCONFIGURED.value
        if self.status is None:
            return self.error or "error"
        if self.status in (408, 429):
            return str(self.status)
        return f"{self.status // 100}xx"


def classify(status: int | None) -> Kind:
    """Classify a status code (None: no answer, so retryable)."""
    if status is None:
        return Kind.RETRYABLE
    if 200 <= status < 300:
        return Kind.SUCCESS
    # A redirect is never followed (it would turn the POST into a bodyless GET), so
    # the events did not arrive; they wait for the URL to be fixed.
    if status in (408, 429) or status >= 500 or 300 <= status < 400:
        return Kind.RETRYABLE
    return Kind.PERMANENT


def compute_backoff(
    attempts: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempts)]."""
    ceiling = min(cap_s, base_s * (2 ** min(attempts, 32)))
    return (rng or random).uniform(0, ceiling)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # float() also reads "nan" and "inf", which no server means as a delay.
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - now, 0.0)


def next_delay(
    outcome: Outcome,
    attempts: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_cap_s: float = math.inf,
) -> float:
    """How long to wait before the next try of events that got `outcome`."""
    backoff = compute_backoff(attempts, base_s=base_s, cap_s=cap_s)
    if outcome.retry_after_s is not None:
        # The server said when (within reason: one "Retry-After: 86400" must not stop the
        # relay for a day); a little jitter keeps all workers from returning at once.
        wait = clamp_retry_after(outcome.retry_after_s, retry_after_cap_s)
        return wait + min(backoff, 1.0) * 0.25
    return backoff


def clamp_retry_after(seconds: float, cap_s: float) -> float:
    """A server's Retry-After, bounded by the relay's cap."""
    return min(max(seconds, 0.0), cap_s)


def expired(first_seen: float, now: float, max_age_s: float) -> bool:
    """Whether an event has been trying for longer than it may."""
    return now - first_seen >= max_age_s
