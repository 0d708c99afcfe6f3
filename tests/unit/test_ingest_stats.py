"""Ingest's request stats (relay.ingest.metrics): counted in the process, added up in
Redis's counters, and shown from them as prometheus_client's own Counter and Histogram
would show the same requests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.ingest import metrics

REQUESTS = [
    ("webhook", 200, 0.0004),
    ("webhook", 200, 0.001),  # on a bucket's bound: counted in it (le)
    ("webhook", 503, 0.0011),
    ("batch", 200, 5.0),
    ("batch", 400, 7.5),  # past the last bound: +Inf only
    ("webhook", 200, 0.02),
]
EVENTS = [("webhook", "accepted", 3), ("api", "accepted", 100), ("api", "rejected", 1)]


class FromStats:
    """The families `/metrics` shows for these counters of `keys.STATS`."""

    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        return metrics.ingest_families(self.stats)


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 6))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def shown(stats: dict[str, int]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(FromStats(stats))
    return samples(registry)


def added(*drains: dict[str, int]) -> dict[str, int]:
    """What HINCRBY of each drain in turn leaves in the hash."""
    total: dict[str, int] = {}
    for counts in drains:
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
    return total


def test_stats_added_up_show_what_prometheus_clients_own_metrics_show() -> None:
    first, second = metrics.IngestStats(), metrics.IngestStats()  # two processes
    theirs = CollectorRegistry()
    requests = Counter("relay_ingest_requests", "", ["route", "status"], registry=theirs)
    events = Counter("relay_ingest_events", "", ["route", "outcome"], registry=theirs)
    fallbacks = Counter("relay_ingest_timestamp_fallbacks", "", ["route"], registry=theirs)
    durations = Histogram(
        "relay_ingest_request_duration_seconds", "", ["route"],
        buckets=metrics.DURATION_BUCKETS, registry=theirs,
    )  # fmt: skip
    drains = []
    for n, (route, status, seconds) in enumerate(REQUESTS):
        stats = first if n % 2 else second
        stats.request(route, status, seconds)
        requests.labels(route, str(status)).inc()
        durations.labels(route).observe(seconds)
        if n == 2:
            drains.append(first.drain())  # a drain in the middle: the counts add up
    for route, outcome, count in EVENTS:
        first.events(route, outcome, count)
        events.labels(route, outcome).inc(count)
    second.fallbacks("api", 2)
    fallbacks.labels("api").inc(2)
    drains += [first.drain(), second.drain()]
    assert shown(added(*drains)) == samples(theirs)
    assert ("relay_ingest_request_duration_seconds_bucket",
            (("le", "0.001"), ("route", "webhook")), 2.0) in shown(added(*drains))  # fmt: skip


def test_a_drain_starts_again_and_counts_not_written_come_back() -> None:
    stats = metrics.IngestStats()
    stats.request("webhook", 200, 0.003)
    counts = stats.drain()
    assert counts["ingest_requests:webhook:200"] == 1
    assert counts["ingest_seconds_bucket:webhook:0.005"] == 1
    assert counts["ingest_seconds_sum_us:webhook"] == 3000
    assert stats.drain() == {}
    stats.unsent(counts)  # Redis did not take them
    stats.request("webhook", 200, 0.003)
    again = stats.drain()
    assert again["ingest_requests:webhook:200"] == 2
    assert again["ingest_seconds_sum_us:webhook"] == 6000


def test_no_requests_yet_shows_empty_families() -> None:
    assert shown({"delivered": 5}) == set()
    registry = CollectorRegistry()
    registry.register(FromStats({}))
    assert b"# TYPE relay_ingest_requests_total counter" in generate_latest(registry)
