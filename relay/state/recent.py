"""The stats of the last minutes: delivery latency and ingest's answers, per minute.

The counters of `keys.STATS` only grow, so they say nothing of "lately" without a
Prometheus to take differences. Each minute gets a HASH too (`keys.minute`, kept
`KEEP_S`), written in the same pipelines as those counters (a worker's settlement,
ingest's stats write), from which `relay status` reads the last `WINDOW_MIN` minutes:
the p50/p99 of the time from receipt to ChurnZero's 2xx, and ingest's answers by status.

Delivery latency is a histogram of `LATENCY_BUCKETS` (s), deployment-wide like the other
delivery figures: `relay_delivery_latency_seconds` in /metrics from the same counts.
"""

from __future__ import annotations

import time
from typing import Any

from relay import keys

WINDOW_MIN = 5  # the minutes `relay status` looks back on (the current one included)
KEEP_S = 15 * 60
# Upper bounds (s) of the delivery-latency histogram: receipt to ChurnZero's 2xx, from
# a fast relay's fraction of a second to a long outage's hours.
LATENCY_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
)  # fmt: skip
_BOUNDS = [*map(str, LATENCY_BUCKETS), "+Inf"]
LATENCY = "latency:"  # a minute's field per bucket: latency:<upper bound>
INGEST = "ingest:"  # a minute's field per answer: ingest:<route>:<status>


def minute_of(now: float) -> int:
    """The minute (unix time // 60) of `now`."""
    return int(now // 60)


def stage_minute(pipe: Any, fields: dict[str, int], now: float) -> None:
    """Queue on a pipeline: add to these fields of the minute of `now`."""
    if not fields:
        return
    key = keys.minute(str(minute_of(now)))
    for name, value in fields.items():
        if value:
            pipe.hincrby(key, name, value)
    pipe.expire(key, KEEP_S)


def latency_counts(latencies: list[float]) -> dict[str, int]:
    """The histogram bucket (upper bound, as text) of each latency, counted."""
    counts: dict[str, int] = {}
    for seconds in latencies:
        bound = next((str(b) for b in LATENCY_BUCKETS if seconds <= b), "+Inf")
        counts[bound] = counts.get(bound, 0) + 1
    return counts


def stage_latencies(pipe: Any, latencies: list[float], now: float) -> None:
    """Queue on a pipeline: delivered events' latencies (s, receipt to 2xx) into the
    deployment's histogram and this minute's."""
    if not latencies:
        return
    counts = latency_counts(latencies)
    for bound, count in counts.items():
        pipe.hincrby(keys.STATS, keys.Stat.LATENCY_BUCKET.of(bound), count)
    pipe.hincrby(keys.STATS, keys.Stat.LATENCY_COUNT, len(latencies))
    pipe.hincrby(keys.STATS, keys.Stat.LATENCY_SUM_MS, round(sum(latencies) * 1000))
    stage_minute(pipe, {LATENCY + bound: count for bound, count in counts.items()}, now)


def latency_histogram(stats: dict[str, int]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) buckets and the sum (s) of the latency histogram in `stats`."""
    running, buckets = 0, []
    for bound in _BOUNDS:
        running += stats.get(keys.Stat.LATENCY_BUCKET.of(bound), 0)
        buckets.append((bound, running))
    return buckets, stats.get(keys.Stat.LATENCY_SUM_MS, 0) / 1000


def quantile(q: float, counts: dict[str, int]) -> float | None:
    """The q-quantile of a histogram (counts per upper bound), interpolated within its
    bucket as Prometheus's histogram_quantile does; None when it is empty. A quantile in
    the last, unbounded bucket is given as the highest bound."""
    total = sum(counts.values())
    if not total:
        return None
    rank, running, lower = q * total, 0, 0.0
    for bound in _BOUNDS:
        count = counts.get(bound, 0)
        if bound == "+Inf":
            return LATENCY_BUCKETS[-1]
        upper = float(bound)
        if count and running + count >= rank:
            return round(lower + (upper - lower) * (rank - running) / count, 3)
        running, lower = running + count, upper
    return LATENCY_BUCKETS[-1]


def read(r: Any, now: float | None = None) -> dict[str, Any]:
    """The last `WINDOW_MIN` minutes: delivery latency p50/p99 and count, and ingest's
    answers by status (and the 4xx of them by route and status)."""
    now = time.time() if now is None else now
    last = minute_of(now)
    pipe = r.pipeline(transaction=False)
    for minute in range(last - WINDOW_MIN + 1, last + 1):
        pipe.hgetall(keys.minute(str(minute)))
    latency: dict[str, int] = {}
    by_status: dict[str, int] = {}
    refused: dict[str, int] = {}
    for found in pipe.execute():
        for raw_name, raw_value in found.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
            value = int(raw_value)
            if name.startswith(LATENCY):
                bound = name.removeprefix(LATENCY)
                latency[bound] = latency.get(bound, 0) + value
            elif name.startswith(INGEST):
                answer = name.removeprefix(INGEST)
                code = answer.rpartition(":")[2]
                by_status[code] = by_status.get(code, 0) + value
                if code.startswith("4"):
                    refused[answer] = refused.get(answer, 0) + value
    return {
        "minutes": WINDOW_MIN,
        "delivery_latency_s": {
            "count": sum(latency.values()),
            "p50": quantile(0.5, latency),
            "p99": quantile(0.99, latency),
        },
        "ingest_requests": {
            "by_status": dict(sorted(by_status.items())),
            "4xx": sum(v for k, v in by_status.items() if k.startswith("4")),
            "4xx_by_route": dict(sorted(refused.items())),
        },
    }
