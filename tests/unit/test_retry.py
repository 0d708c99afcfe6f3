"""relay.retry: what is retried, after how long."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from relay.retry import (
    Kind,
    Outcome,
    classify,
    compute_backoff,
    expired,
    next_delay,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, Kind.SUCCESS),
        (204, Kind.SUCCESS),
        (299, Kind.SUCCESS),
        (301, Kind.RETRYABLE),  # never followed: the events did not arrive
        (302, Kind.RETRYABLE),
        (308, Kind.RETRYABLE),
        (400, Kind.PERMANENT),
        (401, Kind.PERMANENT),
        (403, Kind.PERMANENT),
        (404, Kind.PERMANENT),
        (408, Kind.RETRYABLE),
        (409, Kind.PERMANENT),
        (413, Kind.PERMANENT),
        (429, Kind.RETRYABLE),
        (500, Kind.RETRYABLE),
        (502, Kind.RETRYABLE),
        (503, Kind.RETRYABLE),
        (504, Kind.RETRYABLE),
        (None, Kind.RETRYABLE),
    ],
)
def test_classify(status: int | None, kind: Kind) -> None:
    assert classify(status) is kind
    assert Outcome(status).kind is kind


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        (Outcome(200), "2xx"),
        (Outcome(404), "4xx"),
        (Outcome(408), "408"),
        (Outcome(429), "429"),
        (Outcome(503), "5xx"),
        (Outcome(None, error="timeout"), "timeout"),
        (Outcome(None), "error"),
        (Outcome(301, misconfigured="redirect"), "misconfigured"),
        (Outcome(200, misconfigured="html"), "misconfigured"),
    ],
)
def test_outcome_label_is_low_cardinality(outcome: Outcome, label: str) -> None:
    assert outcome.label == label


# --- backoff ----------------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 2, 5, 10])
def test_backoff_is_full_jitter_within_the_exponential_ceiling(attempts: int) -> None:
    rng = random.Random(1234)
    base, cap = 0.5, 60.0
    ceiling = min(cap, base * 2**attempts)
    delays = [compute_backoff(attempts, base_s=base, cap_s=cap, rng=rng) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    # Full jitter: spread over the whole range, not bunched at the ceiling.
    assert min(delays) < ceiling * 0.1
    assert max(delays) > ceiling * 0.9


def test_backoff_never_exceeds_the_cap_even_after_many_attempts() -> None:
    rng = random.Random(7)
    for attempts in (20, 64, 1000, 10**6):
        delays = [compute_backoff(attempts, base_s=1.0, cap_s=30.0, rng=rng) for _ in range(50)]
        assert all(0 <= d <= 30.0 for d in delays)


def test_backoff_is_reproducible_with_a_seeded_random() -> None:
    first = [compute_backoff(3, base_s=1, cap_s=60, rng=random.Random(42)) for _ in range(3)]
    again = [compute_backoff(3, base_s=1, cap_s=60, rng=random.Random(42)) for _ in range(3)]
    assert first == again


def test_backoff_grows_with_attempts_on_average() -> None:
    rng = random.Random(99)

    def mean(attempts: int) -> float:
        runs = [compute_backoff(attempts, base_s=1, cap_s=1000, rng=rng) for _ in range(400)]
        return sum(runs) / len(runs)

    assert mean(0) < mean(3) < mean(6)


# --- Retry-After ------------------------------------------------------------------------

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()


def http_date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset_s, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        ("2.5", 2.5),
        (" 120 ", 120.0),
        ("-5", 0.0),
        (http_date(30), 30.0),
        (http_date(3600), 3600.0),
        (http_date(-30), 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "3 seconds", "Tomorrow at noon"])
def test_unusable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "Infinity"])
def test_non_finite_retry_after_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_retry_after_date_is_measured_from_now() -> None:
    header = "Wed, 21 Oct 2015 07:28:00 GMT"
    then = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert parse_retry_after(header, then - 90) == pytest.approx(90.0)
    assert parse_retry_after(header, then - timedelta(hours=1).total_seconds()) == 3600.0


# --- next delay -------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [0.0, 2.0, 3600.0])
def test_next_delay_honours_retry_after(retry_after: float) -> None:
    outcome = Outcome(429, retry_after_s=retry_after)
    for attempts in (0, 5, 30):
        delay = next_delay(outcome, attempts, base_s=1.0, cap_s=600.0)
        # Never before the server said; at most a quarter second of jitter after it.
        assert retry_after <= delay <= retry_after + 0.25


def test_next_delay_retry_after_beyond_the_cap_is_still_honoured() -> None:
    delay = next_delay(Outcome(503, retry_after_s=900.0), 0, base_s=1.0, cap_s=60.0)
    assert delay >= 900.0


@pytest.mark.parametrize("retry_after", [301.0, 86_400.0, 1e12])
def test_next_delay_retry_after_is_capped_by_the_relay(retry_after: float) -> None:
    # "Come back tomorrow" from a gateway must not stop the relay for a day.
    outcome = Outcome(429, retry_after_s=retry_after)
    delay = next_delay(outcome, 0, base_s=1.0, cap_s=60.0, retry_after_cap_s=300.0)
    assert 300.0 <= delay <= 300.25


@pytest.mark.parametrize("attempts", [0, 3, 20])
def test_next_delay_without_retry_after_is_the_backoff(attempts: int) -> None:
    ceiling = min(60.0, 0.5 * 2**attempts)
    for _ in range(200):
        delay = next_delay(Outcome(503), attempts, base_s=0.5, cap_s=60.0)
        assert 0 <= delay <= ceiling
        assert math.isfinite(delay)


@pytest.mark.parametrize(
    ("age_s", "is_expired"),
    [(0, False), (4 * 3600 - 1, False), (4 * 3600, True), (5 * 3600, True)],
)
def test_expired_after_max_age(age_s: float, is_expired: bool) -> None:
    assert expired(first_seen=NOW - age_s, now=NOW, max_age_s=4 * 3600) is is_expired


def test_a_misconfigured_answer_is_retried_even_with_status_200() -> None:
    assert Outcome(200, misconfigured="200 with text/html").kind is Kind.RETRYABLE
