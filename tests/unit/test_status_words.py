"""The figures of the last minutes and how `relay status` words them: latency
quantiles from the per-minute histogram, new names as a count, a rate that has met no
limit yet called so, every ChurnZero problem with what to check."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from relay.ops import cli_status
from relay.state import recent


def test_quantiles_interpolate_within_the_bucket_as_prometheus_does() -> None:
    counts = recent.latency_counts([0.05] * 50 + [0.3] * 49 + [20.0])
    assert counts == {"0.1": 50, "0.5": 49, "30.0": 1}
    assert recent.quantile(0.5, counts) == pytest.approx(0.1)
    assert 0.25 < recent.quantile(0.9, counts) <= 0.5  # type: ignore[operator]
    assert recent.quantile(0.999, counts) == pytest.approx(29.0, abs=1.0)
    assert recent.quantile(0.5, {}) is None
    assert recent.quantile(0.99, recent.latency_counts([10**6])) == recent.LATENCY_BUCKETS[-1]


def report(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "depth": {"ready": 0, "in_flight": 0, "delayed": 3, "dead": 0},
        "oldest_age_s": 42.0,
        "oldest_age_by_state_s": {
            "ready": 0.0,
            "in_flight": 0.0,
            "delayed": 42.0,
            "identity_wait": 7.5,
        },
        "rates": {"ingested": {"per_s": 1.0}, "delivered": {"per_s": 0.0}},
        "recent": {
            "minutes": 5,
            "delivery_latency_s": {"count": 0, "p50": None, "p99": None},
            "ingest_requests": {"by_status": {}, "4xx": 0, "4xx_by_route": {}},
        },
        "redis_memory_fraction": 0.0,
        "replay": {"replayed": 0, "queued_messages": 0, "delivered": 0},
        "learned_rate_rps": None,
        "rate_limit_met": False,
        "paused_for_s": 0.0,
        "churnzero_problems": [],
        "dead_letters": {},
        "names": {"held": [], "new": []},
    }
    return base | changes


def shown(data: dict[str, Any]) -> str:
    console = Console(width=200, record=True)
    console.print(cli_status.table(data, 10_000))
    return console.export_text()


def test_status_shows_the_oldest_age_by_state() -> None:
    text = shown(report())
    assert "oldest undelivered" in text and "42.0 s" in text
    assert "oldest delayed (retries)" in text and "oldest waiting for identity" in text
    assert "oldest in flight" not in text  # nothing waits there


def test_new_names_are_a_count_with_a_pointer() -> None:
    new = [{"kind": "event", "name": f"Event {i}", "at": 0} for i in range(200)]
    text = shown(report(names={"held": [], "new": new}))
    assert "Event 1" not in text
    assert "200: relay names list" in text


def test_a_rate_that_met_no_limit_says_so() -> None:
    text = shown(report(learned_rate_rps=10_000.0, rate_limit_met=False))
    assert "no limit met yet (cap 10,000)" in text
    assert "10,000.0 req/s" not in text
    assert "42.5 req/s" in shown(report(learned_rate_rps=42.5, rate_limit_met=True))


def test_the_last_minutes_show_latency_and_refusals() -> None:
    figures = {
        "minutes": 5,
        "delivery_latency_s": {"count": 9, "p50": 0.4, "p99": 2.5},
        "ingest_requests": {"by_status": {"401": 3}, "4xx": 3, "4xx_by_route": {"webhook:401": 3}},
    }
    text = shown(report(recent=figures))
    assert "p50 0.40 s, p99 2.50 s" in text
    assert "ingest 4xx (5 min)" in text and "webhook:401 x3" in text


def test_a_problem_shows_with_what_to_check() -> None:
    problem = {
        "kind": "dns",
        "problem": "probable configuration error: ClientConnectorDNSError",
        "host": "analytics.churnzer0.invalid:443",
        "hint": "check RELAY_CHURNZERO_URL",
        "at": 0,
    }
    text = shown(report(churnzero_problems=[problem]))
    assert "ChurnZero host does not resolve" in text
    assert "probable configuration error" in text and "check RELAY_CHURNZERO_URL" in text
