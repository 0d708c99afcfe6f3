"""Ingest's request figures (relay.ingest.metrics.IngestFigures) expose what
prometheus_client's own Counter and Histogram would, for the same requests."""

from __future__ import annotations

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


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_figures_match_prometheus_clients_own_metrics() -> None:
    ours = CollectorRegistry()
    figures = metrics.IngestFigures()
    ours.register(figures)
    theirs = CollectorRegistry()
    requests = Counter("relay_ingest_requests", "", ["route", "status"], registry=theirs)
    events = Counter("relay_ingest_events", "", ["route", "outcome"], registry=theirs)
    durations = Histogram(
        "relay_ingest_request_duration_seconds", "", ["route"],
        buckets=metrics.DURATION_BUCKETS, registry=theirs,
    )  # fmt: skip
    for route, status, seconds in REQUESTS:
        figures.request(route, status, seconds)
        requests.labels(route, str(status)).inc()
        durations.labels(route).observe(seconds)
    for route, outcome, count in EVENTS:
        figures.events(route, outcome, count)
        events.labels(route, outcome).inc(count)
    assert samples(ours) == samples(theirs)
    assert ("relay_ingest_request_duration_seconds_bucket",
            (("le", "0.001"), ("route", "webhook")), 2.0) in samples(ours)  # fmt: skip


def test_no_requests_yet_shows_empty_families() -> None:
    registry = CollectorRegistry()
    registry.register(metrics.IngestFigures())
    assert samples(registry) == set()
    assert b"# TYPE relay_ingest_requests_total counter" in generate_latest(registry)
