"""Prometheus metrics.

Ingest's own request figures are in-process: `IngestFigures` keeps them as plain numbers,
shown when scraped. Queue and delivery figures
belong to the whole deployment (many workers on many hosts), so workers count them in
Redis and `DeploymentCollector` shows them at scrape time, as relay.state.status reads them:
one scrape of any ingest instance shows them all.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from relay.keys import Stat
from relay.state import status

REGISTRY = CollectorRegistry(auto_describe=True)

INGEST_TIMESTAMP_FALLBACKS = Counter(
    "relay_ingest_timestamp_fallbacks_total",
    "Events whose timestamp could not be read; the receive time stood in (flagged).",
    ["route"],
    registry=REGISTRY,
)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class IngestFigures:
    """Ingest's request figures: plain numbers, kept on the event loop, shown as
    Prometheus metrics when scraped.

    prometheus_client's metrics take a lock and several calls per update, and a request
    updated three: with the request log's bookkeeping, 13 % of a single-event webhook
    request's CPU (measured by leaving both out). The event loop is the only writer here,
    and `/metrics` renders this registry on the loop too, so no lock is needed."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}
        self._events: dict[tuple[str, str], int] = {}
        # Per route: the count of each bucket (`+Inf` last), then the sum of durations.
        self._durations: dict[str, list[float]] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        """One answered request of `route`, and how long it took."""
        key = (route, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        counts = self._durations.get(route)
        if counts is None:
            counts = self._durations[route] = [0] * (len(DURATION_BUCKETS) + 2)
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1  # le: the first bound >= it
        counts[-1] += seconds

    def events(self, route: str, outcome: str, count: int) -> None:
        """`count` events of a route kind (webhook, api) with this outcome."""
        key = (route, outcome)
        self._events[key] = self._events.get(key, 0) + count

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "relay_ingest_requests", "Ingest HTTP requests by route and answer.",
            labels=["route", "status"],
        )  # fmt: skip
        for (route, status_code), count in sorted(self._requests.items()):
            requests.add_metric([route, str(status_code)], count)
        yield requests
        events = CounterMetricFamily(
            "relay_ingest_events",
            "Events received by ingest, by route and outcome (accepted, rejected, skipped).",
            labels=["route", "outcome"],
        )
        for labels, count in sorted(self._events.items()):
            events.add_metric(list(labels), count)
        yield events
        durations = HistogramMetricFamily(
            "relay_ingest_request_duration_seconds",
            "Time to answer an ingest request (includes waiting for the group commit).",
            labels=["route"],
        )
        bounds = [*(str(float(b)) for b in DURATION_BUCKETS), "+Inf"]
        for route, counts in sorted(self._durations.items()):
            cumulative = list(accumulate(counts[:-1]))
            durations.add_metric([route], list(zip(bounds, cumulative, strict=True)), counts[-1])
        yield durations


FIGURES = IngestFigures()
REGISTRY.register(FIGURES)


class DeploymentCollector:
    """Queue depths and delivery counters of the whole deployment, read from Redis."""

    def __init__(self, redis_client: Any) -> None:
        self._redis = redis_client

    def describe(self) -> list[Metric]:
        return []  # values are read at collect time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        snapshot = status.snapshot(self._redis)
        depth = GaugeMetricFamily(
            "relay_queue_events", "Events in the relay by state.", labels=["state"]
        )
        for state in ("ready", "in_flight", "delayed", "dead"):
            depth.add_metric([state], snapshot.depth[state])
        yield depth
        yield GaugeMetricFamily(
            "relay_queue_messages",
            "Celery messages waiting in the relay queue.",
            value=snapshot.messages,
        )
        yield GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest event waiting to be picked up (0 when none).",
            value=snapshot.oldest_age_s,
        )
        yield GaugeMetricFamily(
            "relay_redis_memory_used_ratio",
            "Redis used_memory / maxmemory (0 when maxmemory is unlimited); ingest answers "
            "503 above RELAY_MAX_MEMORY_FRACTION.",
            value=snapshot.memory_fraction,
        )
        yield GaugeMetricFamily(
            "relay_churnzero_paused",
            "1 while every worker holds back from ChurnZero (429 or outage).",
            value=1.0 if snapshot.paused_for_s > 0 else 0.0,
        )
        dead = GaugeMetricFamily(
            "relay_dead_letters", "Dead letters waiting, by reason.", labels=["reason"]
        )
        for reason, count in snapshot.dead_by_reason.items():
            dead.add_metric([reason], count)
        yield dead
        buckets, total = status.request_histogram(snapshot.stats)
        yield HistogramMetricFamily(
            "relay_churnzero_request_duration_seconds",
            "Time of requests to ChurnZero, all workers.",
            buckets=buckets,
            sum_value=total,
        )
        yield from _counters(snapshot.stats)


# Each counter of relay:stats shown: (metric, help, label name; None: unlabelled).
_COUNTERS: dict[Stat, tuple[str, str, str | None]] = {
    Stat.DELIVERED: ("relay_delivered_events", "Events delivered to ChurnZero.", None),
    Stat.SKIPPED: ("relay_skipped_events", "Events not delivered, by reason.", "reason"),
    Stat.DEAD_LETTERS: ("relay_dead_lettered_events", "Events dead-lettered, by reason.", "reason"),
    Stat.REQUESTS: ("relay_churnzero_requests", "Requests to ChurnZero by outcome.", "outcome"),
    Stat.ATTRIBUTES: (
        "relay_skipped_attributes",
        "Attribute writes not sent, by reason.",
        "reason",
    ),
    Stat.RETRIED: ("relay_retried_events", "Events put back for a later try, by cause.", "cause"),
    Stat.REPLAYED: ("relay_replayed_events", "Dead letters replayed.", None),
    Stat.NEW_NAMES: ("relay_new_names", "Names never sent to ChurnZero before, by kind.", "kind"),
    Stat.RATELIMIT_WAITS: (
        "relay_ratelimit_waits",
        "Times a worker waited for the rate limit.",
        None,
    ),
}


def _counters(stats: dict[str, int]) -> Iterator[Metric]:
    by_stat = status.counters(stats)
    for stat, (metric, help_text, label) in _COUNTERS.items():
        family = CounterMetricFamily(metric, help_text, labels=[label] if label else [])
        for label_value, value in by_stat.get(stat, {}).items():
            family.add_metric([label_value] if label_value else [], value)
        if label is None and not family.samples:
            family.add_metric([], 0)
        yield family
