"""Prometheus metrics.

Every figure belongs to the whole deployment (ingest processes and workers on many
hosts): each process counts its own in Redis, and `DeploymentCollector` shows them all at
scrape time, as relay.state.status reads them: one scrape of any ingest process shows
them all. Ingest counts its request stats in the process first (`IngestStats`) and
adds them to Redis's once a second.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from relay.keys import Stat
from relay.state import archive, parking, recent, status

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BOUNDS = [*(str(float(b)) for b in DURATION_BUCKETS), "+Inf"]  # as Prometheus writes them
STATS_WRITE_S = 1.0  # how often each ingest process adds its stats to Redis's


class IngestStats:
    """Ingest's request stats: counted in the process, added to the deployment's
    counters in Redis every `STATS_WRITE_S` (`drain`, by relay.ingest.app), and shown from
    there by any ingest process's `/metrics`, as the queue and delivery stats are.

    In one place because `relay serve` runs a process per core on one port, and a scrape
    reaches one of them: stats kept per process would show that one's share. Counted in
    plain numbers on the event loop, not in prometheus_client's metrics, which take a lock
    and several calls per update, three updates per request on ingest's hot path. The
    event loop is the only writer, so no lock is needed."""

    def __init__(self) -> None:
        self._reset()
        self._unsent: dict[str, int] = {}

    def _reset(self) -> None:
        self._requests: dict[tuple[str, int], int] = {}
        self._events: dict[tuple[str, str], int] = {}
        self._fallbacks: dict[str, int] = {}
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

    def fallbacks(self, route: str, count: int) -> None:
        """`count` events of a route kind whose timestamp could not be read."""
        self._fallbacks[route] = self._fallbacks.get(route, 0) + count

    def drain(self) -> dict[str, int]:
        """What was counted since the last drain (and what the last write did not take),
        as fields of `keys.STATS` to add to; counting starts again from nothing."""
        out, self._unsent = self._unsent, {}

        def add(name: str, value: float) -> None:
            if value:
                out[name] = out.get(name, 0) + int(value)

        for (route, status_code), count in self._requests.items():
            add(Stat.INGEST_REQUESTS.of(f"{route}:{status_code}"), count)
        for (route, outcome), count in self._events.items():
            add(Stat.INGEST_EVENTS.of(f"{route}:{outcome}"), count)
        for route, count in self._fallbacks.items():
            add(Stat.INGEST_TIMESTAMP_FALLBACKS.of(route), count)
        for route, counts in self._durations.items():
            for bound, in_bucket in zip(_BOUNDS, counts[:-1], strict=True):
                add(Stat.INGEST_SECONDS_BUCKET.of(f"{route}:{bound}"), in_bucket)
            add(Stat.INGEST_SECONDS_SUM_US.of(route), round(counts[-1] * 1_000_000))
        self._reset()
        return out

    def unsent(self, counts: dict[str, int]) -> None:
        """Counts `drain` gave that could not be written: the next drain gives them again."""
        for name, value in counts.items():
            self._unsent[name] = self._unsent.get(name, 0) + value


INGEST_STATS = IngestStats()


def answers_of(counts: dict[str, int]) -> dict[str, int]:
    """The request counts among drained stats, as fields of the minute's stats
    (relay.state.recent): `ingest:<route>:<status>`."""
    prefix = Stat.INGEST_REQUESTS + ":"
    return {
        recent.INGEST + name.removeprefix(prefix): value
        for name, value in counts.items() if name.startswith(prefix)
    }  # fmt: skip


def ingest_families(stats: dict[str, int]) -> Iterator[Metric]:
    """Ingest's stats, every process's, from the counters of `keys.STATS`."""
    requests = CounterMetricFamily(
        "relay_ingest_requests", "Ingest HTTP requests by route and answer.",
        labels=["route", "status"],
    )  # fmt: skip
    events = CounterMetricFamily(
        "relay_ingest_events",
        "Events received by ingest, by route and outcome (accepted, rejected, skipped).",
        labels=["route", "outcome"],
    )
    fallbacks = CounterMetricFamily(
        "relay_ingest_timestamp_fallbacks",
        "Events whose timestamp could not be read; the receive time stood in (flagged).",
        labels=["route"],
    )
    buckets: dict[str, dict[str, int]] = {}
    sums: dict[str, float] = {}
    for name, value in sorted(stats.items()):
        stat, _, label = name.partition(":")
        if stat == Stat.INGEST_REQUESTS:
            route, _, status_code = label.rpartition(":")
            requests.add_metric([route, status_code], value)
        elif stat == Stat.INGEST_EVENTS:
            route, _, outcome = label.rpartition(":")
            events.add_metric([route, outcome], value)
        elif stat == Stat.INGEST_TIMESTAMP_FALLBACKS:
            fallbacks.add_metric([label], value)
        elif stat == Stat.INGEST_SECONDS_BUCKET:
            route, _, bound = label.rpartition(":")
            buckets.setdefault(route, {})[bound] = value
        elif stat == Stat.INGEST_SECONDS_SUM_US:
            sums[label] = value / 1_000_000
    durations = HistogramMetricFamily(
        "relay_ingest_request_duration_seconds",
        "Time to answer an ingest request (includes waiting for the group commit).",
        labels=["route"],
    )
    for route in sorted(buckets.keys() | sums.keys()):
        counts = buckets.get(route, {})
        cumulative = accumulate(counts.get(bound, 0) for bound in _BOUNDS)
        durations.add_metric([route], list(zip(_BOUNDS, cumulative, strict=True)),
                             sums.get(route, 0.0))  # fmt: skip
    yield from (requests, events, fallbacks, durations)


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
            "Age of the oldest undelivered event, whatever holds it: ready, in flight, "
            "delayed or waiting for its identity (0 when none).",
            value=snapshot.oldest_age_s,
        )
        by_state = GaugeMetricFamily(
            "relay_queue_oldest_age_by_state_seconds",
            "Age of the oldest undelivered event in each state (0 when none).",
            labels=["state"],
        )
        for state, age in snapshot.oldest_by_state.items():
            by_state.add_metric([state], age)
        yield by_state
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
        parked = parking.counts(self._redis)
        yield GaugeMetricFamily(
            "relay_parked_attributes",
            "Traits parked for users without an account yet (sent once the user is known).",
            value=parked["traits"],
        )
        yield GaugeMetricFamily(
            "relay_parked_users", "Users with parked traits.", value=parked["users"]
        )
        problem = GaugeMetricFamily(
            "relay_churnzero_problem",
            "1 while a ChurnZero problem of this kind is recent: misconfigured (an answer "
            "that cannot be ChurnZero's), dns, tls, refused, connect_timeout (its host "
            "cannot be reached); relay status says the host, the error and what to check.",
            labels=["kind"],
        )
        recent_kinds = {p.get("kind") for p in snapshot.problems}
        for kind in status.PROBLEM_KINDS:
            problem.add_metric([kind], 1.0 if kind in recent_kinds else 0.0)
        yield problem
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
        buckets, total = recent.latency_histogram(snapshot.stats)
        yield HistogramMetricFamily(
            "relay_delivery_latency_seconds",
            "Time from ingest's receipt of an event to ChurnZero's 2xx for it, every live "
            "event delivered (replays left out).",
            buckets=buckets,
            sum_value=total,
        )
        lag = archive.lag(self._redis, time.time())
        yield GaugeMetricFamily(
            "relay_archive_lag_entries",
            "Settlements whose records the archiver has not yet written to the archive's "
            "files (each holds a batch's events).",
            value=lag["entries"],
        )
        yield GaugeMetricFamily(
            "relay_archive_oldest_age_seconds",
            "Age of the oldest settlement not yet archived (0 when none).",
            value=lag["oldest_age_s"],
        )
        yield from _counters(snapshot.stats)
        yield from ingest_families(snapshot.stats)


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
    Stat.CONTACT_CHANGES: (
        "relay_contact_changes",
        "Users an explicit contactExternalId moved to another ChurnZero contact.",
        None,
    ),
    Stat.PARKED: (
        "relay_parked_traits",
        "Traits parked, released, expired or deleted (parked: per value, newer ones win).",
        "outcome",
    ),
    Stat.RATELIMIT_WAITS: (
        "relay_ratelimit_waits",
        "Times a worker waited for the rate limit.",
        None,
    ),
    Stat.RESENT: (
        "relay_resent_events",
        "Events sent again after a request ChurnZero may have taken (no answer), by cause.",
        "cause",
    ),
    Stat.ARCHIVED: (
        "relay_archived_records",
        "Settled events' records written to the archive's files.",
        None,
    ),
    Stat.ARCHIVER_ERRORS: (
        "relay_archiver_errors",
        "The archiver's failures, by what failed: redis, or store (its files).",
        "what",
    ),
    Stat.OOM_FALLBACKS: (
        "relay_oom_fallbacks",
        "Worker writes run as a plain MULTI, which Redis refuses at maxmemory.",
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
