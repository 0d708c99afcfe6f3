"""`e2e_ab`: today's `relay worker` against an earlier commit's, on the e2e harness.

`python -m tests.bench e2e --baseline REF`: one ingest (today's) and one sandbox (20 ms
per request) serve both sides; each side in turn gets a flushed database and a worker of
its own, then the e2e throughput load (tests.bench.e2e.throughput: a warm-up of
identifies, then tracks in batches of 100, 16 requests at a time). The sides alternate
for `rounds` rounds, who goes first swapping each round, and the figure is the median
over rounds of current / baseline: on a shared machine the rounds' ratios agree far
better than the rounds' rates. The CPU ratio beside it (baseline's CPU per delivered
event over today's, the worker's processes and Redis's together) moves less still.

Only the worker differs. Today's ingest writes what an earlier worker reads: each queued
message is a Celery protocol 2 task message of `relay.deliver_batch` in kombu's Redis
frame on the `relay` list, its body zlib-compressed under kombu's `compression` header
(which any kombu consumer inflates before decoding), carrying the same item fields
(`id`, `source`, `received_at`, `attempts`, `event`).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from tests import procs
from tests.bench import baseline as baseline_commit
from tests.bench import e2e, harness
from tests.bench.e2e import LATENCY_MS, PeakRss
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView

ROUNDS = 3
CURRENT = "current"


def _side(
    env: Env,
    children: procs.Children,
    start: Any,
    ingest: str,
    sandbox: SandboxView,
    events: int,
) -> dict[str, Any]:
    env.flush()
    sandbox.clear()
    load_before = os.getloadavg()[0]
    worker = start()
    try:
        with PeakRss(worker.pid) as rss:
            run = e2e.throughput(env, ingest, sandbox, worker, events)
    finally:
        worker.stop()
    children.procs.remove(worker)
    return {
        "events_per_s": round(run["events_per_s"], 1),
        "delivered": run["delivered"],
        "all_delivered": run["delivered"] >= events,
        "worker_rss_mb": round(rss.peak / 2**20, 1),
        "worker_rss_by_process_mb": rss.by_process,
        "worker_cpu_us_per_event": run["worker_cpu_us_per_event"],
        "redis_cpu_us_per_event": run["redis_cpu_us_per_event"],
        "redis_calls_per_event": run["redis_calls_per_event"],
        "redis_calls": run["redis_calls"],
        "loadavg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def _cpu_ratio(mine: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    """The baseline's CPU per delivered event over today's, worker and Redis together:
    what a shared machine's load moves least (the worker's work done inside Redis's
    scripts counts too)."""
    try:
        cost = mine["worker_cpu_us_per_event"] + mine["redis_cpu_us_per_event"]
        return round(
            (theirs["worker_cpu_us_per_event"] + theirs["redis_cpu_us_per_event"]) / cost, 3
        )
    except (TypeError, ZeroDivisionError):  # a shared Redis: its CPU is not measured
        return None


def _median(rounds: list[dict[str, Any]], side: str, key: str) -> float:
    return float(statistics.median(r[side][key] for r in rounds))


def e2e_ab(env: Env, ref: str, rounds: int = ROUNDS, events: int = e2e.EVENTS) -> dict[str, Any]:
    """Today's worker / `ref`'s on the e2e load: alternated rounds, median ratio."""
    base = baseline_commit.prepare(ref)
    short = ref if len(ref) <= 12 else base.sha[:7]
    with harness.bench_context(env, "e2e_ab") as children:
        sandbox = SandboxView(procs.start_sandbox(children).url)
        sandbox.faults(latency_ms=LATENCY_MS)
        ingest = harness.start_ingest(children, env.redis_url).url
        starts = {
            CURRENT: lambda: harness.start_relay_worker(
                children, env.redis_url, sandbox.url, label="worker-current"
            ),
            short: lambda: baseline_commit.start_worker(
                children, base, env.redis_url, sandbox.url, label="worker-baseline"
            ),
        }
        results: list[dict[str, Any]] = []
        for n in range(rounds):
            order = [CURRENT, short] if n % 2 == 0 else [short, CURRENT]
            result: dict[str, Any] = {"round": n + 1, "first": order[0]}
            for side in order:
                say(f"  round {n + 1}/{rounds}: {side} worker, {events:,} events")
                result[side] = _side(env, children, starts[side], ingest, sandbox, events)
            mine, theirs = result[CURRENT]["events_per_s"], result[short]["events_per_s"]
            result["ratio"] = round(mine / theirs, 3) if theirs else 0.0
            result["cpu_ratio"] = _cpu_ratio(result[CURRENT], result[short])
            say(
                f"  round {n + 1}: {CURRENT} {mine:,.0f} ev/s, {short} {theirs:,.0f} ev/s, "
                f"ratio {result['ratio']:.2f}; RSS {result[CURRENT]['worker_rss_mb']:.0f} vs "
                f"{result[short]['worker_rss_mb']:.0f} MB"
            )
            results.append(result)
    ratio = statistics.median(r["ratio"] for r in results)
    complete = all(r[s]["all_delivered"] for r in results for s in (CURRENT, short))
    rss = _median(results, CURRENT, "worker_rss_mb")
    return {
        "name": "e2e_ab",
        "baseline_ref": ref,
        "baseline_sha": base.sha,
        "baseline_own_venv": base.own_venv,
        "events_per_s": round(_median(results, CURRENT, "events_per_s"), 1),
        "baseline_per_s": round(_median(results, short, "events_per_s"), 1),
        "ratio": round(ratio, 3),
        "cpu_ratio": (
            statistics.median(cpus)
            if (cpus := [r["cpu_ratio"] for r in results if r["cpu_ratio"] is not None])
            else None
        ),
        "p99_ms": None,
        "worker_rss_mb": rss,
        "baseline_worker_rss_mb": _median(results, short, "worker_rss_mb"),
        "worker_cpu_us_per_event": _median(results, CURRENT, "worker_cpu_us_per_event"),
        "baseline_worker_cpu_us_per_event": _median(results, short, "worker_cpu_us_per_event"),
        "events": events,
        "rounds": results,
        "all_delivered": complete,
        "target": f">= 1.5 x {short} (median of alternated rounds), every event delivered",
        "met": ratio >= 1.5 and complete,
    }
