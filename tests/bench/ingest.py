"""`ingest_webhook` and `ingest_batch`: one `relay serve` against a bare aiohttp handler,
both loaded by the same wrk (2 threads, 50 connections), no worker running;
`ingest_processes`: `relay serve --processes 2` against one process.

The two sides run in alternating rounds (`ROUNDS` of `ROUND_SECONDS` each, the order
swapped every round), and the ratio is the median of the rounds' ratios: this machine's
speed drifts by half within a minute (a plain loop took 0.22-0.34 s from one second to
the next), so a baseline measured a minute apart from the relay said more of the machine
than of the relay. Throughput is the median round's rate (one round stalled by the
machine does not drag the figure down; every round's rate is kept in the result); CPU is
the rounds' total; p99 is the worst round's.

Between rounds the database is emptied and Redis's AOF rewritten while it is empty, so
no rewrite (a fork of Redis, on a machine of two cores) starts inside a round: with the
queue never drained, the AOF doubles every few rounds. Each round records the fsyncs
Redis postponed (a busy disk: past two seconds Redis stops taking writes) and its forks,
the stalls that made this row swing when they fell in one side's rounds. The table also
gives events per CPU-second of the server and the cores it got: on a shared machine the
rate follows the CPU the server was given, its cost per event far less.

After the runs the queue is counted: every request answered 200 must have its events in
the `relay` list.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from relay import wire
from tests import procs
from tests.bench import harness, wrk
from tests.bench.harness import Env, say
from tests.bench.payloads import basic_auth, batch_body, track
from tests.bench.wrk import WrkResult

BATCH_EVENTS = 100


def queued_events(env: Env) -> tuple[int, int, int]:
    """(events in the `relay` list, messages there, the `relay:depth:ready` counter)."""
    r = env.redis()
    try:
        total = messages = 0
        length = r.llen("relay")
        for start in range(0, length, 500):
            for raw in r.lrange("relay", start, start + 499):
                total += len(wire.items_of(orjson.loads(raw)))
                messages += 1
        depth = int(r.get("relay:depth:ready") or 0)
        return total, messages, depth
    finally:
        r.close()


ROUNDS = int(os.environ.get("RELAY_BENCH_ROUNDS", "5"))
ROUND_SECONDS = 4.0


def _start_bare(children: procs.Children) -> procs.Proc:
    port = procs.free_port()
    proc = children.start("bare", [sys.executable, "-m", "tests.bench.bare", "--port", str(port)])
    proc.url = f"http://127.0.0.1:{port}"
    procs.wait_http(proc.url + "/livez", proc)
    return proc


def _measure(
    env: Env, proc: procs.Proc, path: str, body: bytes, headers: dict[str, str]
) -> WrkResult:
    cpu, (fsyncs, forks) = harness.cpu_seconds(proc), env.stalls()
    result = wrk.run(proc.url + path, body, headers, ROUND_SECONDS)
    result.server_cpu_s = harness.cpu_seconds(proc) - cpu
    fsyncs_after, forks_after = env.stalls()
    result.aof_delayed_fsync, result.redis_forks = fsyncs_after - fsyncs, forks_after - forks
    return result


def merged(rounds: list[WrkResult]) -> WrkResult:
    """The rounds as one result: the median round's rate, totals, median p50/p90, the worst
    round's p99 and max."""
    return WrkResult(
        requests=sum(r.requests for r in rounds),
        duration_s=sum(r.duration_s for r in rounds),
        rps=statistics.median(r.rps for r in rounds),
        non_2xx=sum(r.non_2xx for r in rounds),
        socket_errors=sum(r.socket_errors for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds),
        p90_ms=statistics.median(r.p90_ms for r in rounds),
        p99_ms=max(r.p99_ms for r in rounds),
        max_ms=max(r.max_ms for r in rounds),
        server_cpu_s=sum(r.server_cpu_s or 0.0 for r in rounds),
        aof_delayed_fsync=sum(r.aof_delayed_fsync for r in rounds),
        redis_forks=sum(r.redis_forks for r in rounds),
        rounds_rps=[round(r.rps, 1) for r in rounds],
    )


def alternate(
    env: Env, a: procs.Proc, b: procs.Proc, path: str, body: bytes, headers: dict[str, str]
) -> tuple[list[WrkResult], list[WrkResult], tuple[int, int, int]]:
    """`ROUNDS` rounds of `a` and `b` in turn (who goes first swaps each round), after a
    warm-up of each, and what they queued: (events, messages, the ready-depth counter).

    The queue is counted and emptied after each measured run: no worker drains it, and a
    queue grown past ingest's admission check would be answered 503, not measured."""
    for proc in (a, b):
        wrk.run(proc.url + path, body, headers, wrk.WARMUP_SECONDS)
    time.sleep(1)  # requests cut off by the warm-up's end finish publishing
    env.flush()  # count only what the measured rounds queue
    env.rewrite_aof()
    a_rounds: list[WrkResult] = []
    b_rounds: list[WrkResult] = []
    counted = [0, 0, 0]
    for n in range(ROUNDS):
        pair: list[tuple[procs.Proc, list[WrkResult]]] = [(a, a_rounds), (b, b_rounds)]
        for proc, into in pair if n % 2 == 0 else reversed(pair):
            into.append(_measure(env, proc, path, body, headers))
            # Every answered request's events are in Redis by now (a 200 comes after).
            counted = [x + y for x, y in zip(counted, queued_events(env), strict=True)]
            env.flush()
            env.rewrite_aof()
    return a_rounds, b_rounds, (counted[0], counted[1], counted[2])


def median_ratio(
    top: list[WrkResult], bottom: list[WrkResult], of: Callable[[WrkResult], float]
) -> float:
    """The median over rounds of of(top) / of(bottom)."""
    pairs = zip(top, bottom, strict=True)
    return statistics.median(of(t) / of(b) if of(b) else 0.0 for t, b in pairs)


def _compare(
    env: Env, children: procs.Children, path: str, body: bytes, headers: dict[str, str]
) -> tuple[WrkResult, WrkResult, float, tuple[int, int, int]]:
    """The relay against the bare handler: (relay, bare, median ratio, queue count)."""
    say(f"  bare aiohttp handler and relay serve: {ROUNDS} rounds of {ROUND_SECONDS:g} s "
        f"each on {path}")  # fmt: skip
    bare = _start_bare(children)
    relay = harness.start_ingest(children, env.redis_url, label="ingest-1")
    relay_rounds, bare_rounds, counted = alternate(env, relay, bare, path, body, headers)
    ratio = median_ratio(relay_rounds, bare_rounds, lambda r: r.rps)
    return merged(relay_rounds), merged(bare_rounds), ratio, counted


def cpu_ratio(relay: WrkResult, bare: WrkResult) -> float | None:
    """Bare CPU per request over the relay's: the ratio a busy shared machine blurs least."""
    mine, theirs = relay.as_dict(), bare.as_dict()
    if "server_cpu_us_per_request" not in mine or "server_cpu_us_per_request" not in theirs:
        return None
    return round(float(theirs["server_cpu_us_per_request"] / mine["server_cpu_us_per_request"]), 3)


def ingest_webhook(env: Env) -> dict[str, Any]:
    """Single signed events on /webhook."""
    body = orjson.dumps(track(1))
    headers = {
        "Content-Type": "application/json",
        "X-Signature": harness.signature(body),
    }
    with harness.bench_context(env, "ingest_webhook") as children:
        relay, bare, ratio, (queued, messages, depth) = _compare(
            env, children, "/webhook", body, headers
        )
    queue_ok = queued >= relay.ok
    return {
        "name": "ingest_webhook",
        "events_per_s": round(relay.rps, 1),
        "baseline_per_s": round(bare.rps, 1),
        "ratio": round(ratio, 3),
        "cpu_ratio": cpu_ratio(relay, bare),
        "p99_ms": round(relay.p99_ms, 2),
        "baseline_p99_ms": round(bare.p99_ms, 2),
        "payload_bytes": len(body),
        "relay": relay.as_dict(),
        "baseline": bare.as_dict(),
        "answered_2xx": relay.ok,
        "non_2xx": relay.non_2xx,
        "queued_events": queued,
        "queued_messages": messages,
        "depth_ready": depth,
        "queue_check": queue_ok,
        "target": "ratio >= 0.5 and p99 <= 25 ms (and queued events >= 200 answers)",
        "met": ratio >= 0.5 and relay.p99_ms <= 25 and queue_ok,
    }


def ingest_batch(env: Env) -> dict[str, Any]:
    """/v1/batch with 100 events per request, Basic auth write key."""
    body = batch_body([track(i) for i in range(BATCH_EVENTS)])
    headers = {"Content-Type": "application/json", "Authorization": basic_auth()}
    with harness.bench_context(env, "ingest_batch") as children:
        relay, bare, ratio, (queued, messages, depth) = _compare(
            env, children, "/v1/batch", body, headers
        )
    events_per_s = relay.rps * BATCH_EVENTS
    baseline = bare.rps * BATCH_EVENTS
    queue_ok = queued >= relay.ok * BATCH_EVENTS
    return {
        "name": "ingest_batch",
        "events_per_s": round(events_per_s, 1),
        "baseline_per_s": round(baseline, 1),
        "ratio": round(ratio, 3),
        "cpu_ratio": cpu_ratio(relay, bare),
        "p99_ms": round(relay.p99_ms, 2),
        "baseline_p99_ms": round(bare.p99_ms, 2),
        "events_per_request": BATCH_EVENTS,
        "payload_bytes": len(body),
        "relay": relay.as_dict(),
        "baseline": bare.as_dict(),
        "answered_2xx": relay.ok,
        "non_2xx": relay.non_2xx,
        "queued_events": queued,
        "queued_messages": messages,
        "depth_ready": depth,
        "queue_check": queue_ok,
        "target": "events_per_s >= 60,000 per process (and queued events >= 100 x 200 answers)",
        "met": events_per_s >= 60_000 and queue_ok,
    }


def ingest_processes(env: Env) -> dict[str, Any]:
    """/v1/batch of 100 events: `relay serve --processes 2` against one process."""
    body = batch_body([track(i) for i in range(BATCH_EVENTS)])
    headers = {"Content-Type": "application/json", "Authorization": basic_auth()}
    with harness.bench_context(env, "ingest_processes") as children:
        say(f"  relay serve --processes 1 and 2: {ROUNDS} rounds of {ROUND_SECONDS:g} s each "
            "on /v1/batch")  # fmt: skip
        singles = harness.start_ingest(children, env.redis_url, label="ingest-1")
        doubles = harness.start_ingest(
            children, env.redis_url, label="ingest-2", ingest_processes=2
        )
        two_rounds, one_rounds, (queued, _, _) = alternate(
            env, doubles, singles, "/v1/batch", body, headers
        )
    one, two = merged(one_rounds), merged(two_rounds)
    ratio = median_ratio(two_rounds, one_rounds, lambda r: r.rps)
    queue_ok = queued >= (one.ok + two.ok) * BATCH_EVENTS
    return {
        "name": "ingest_processes",
        "events_per_s": round(two.rps * BATCH_EVENTS, 1),
        "baseline_per_s": round(one.rps * BATCH_EVENTS, 1),
        "ratio": round(ratio, 3),
        "p99_ms": round(two.p99_ms, 2),
        "baseline_p99_ms": round(one.p99_ms, 2),
        "cores": len(os.sched_getaffinity(0)),
        "events_per_request": BATCH_EVENTS,
        "relay": two.as_dict(),
        "baseline": one.as_dict(),
        "answered_2xx": one.ok + two.ok,
        "non_2xx": one.non_2xx + two.non_2xx,
        "queued_events": queued,
        "queue_check": queue_ok,
        "target": "2 processes >= 1.6 x 1 (batch events/s, same wrk)",
        "met": ratio >= 1.6 and queue_ok,
    }
