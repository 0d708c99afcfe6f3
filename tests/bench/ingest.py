"""`ingest_webhook` and `ingest_batch`: one `relay serve` against a bare aiohttp handler,
both loaded by the same wrk (2 threads, 50 connections), no worker running.

After the relay's run the queue is counted: every request answered 200 must have its
events in the `relay` list.
"""

from __future__ import annotations

import os
import sys
import time
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


def _bare(children: procs.Children, path: str, body: bytes, headers: dict[str, str]) -> WrkResult:
    port = procs.free_port()
    proc = children.start("bare", [sys.executable, "-m", "tests.bench.bare", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(url + "/livez", proc)
    wrk.run(url + path, body, headers, wrk.WARMUP_SECONDS)
    cpu = harness.cpu_seconds(proc)
    result = wrk.run(url + path, body, headers)
    result.server_cpu_s = harness.cpu_seconds(proc) - cpu
    proc.stop()
    return result


def _relay(
    env: Env,
    children: procs.Children,
    path: str,
    body: bytes,
    headers: dict[str, str],
    processes: int = 1,
) -> tuple[WrkResult, tuple[int, int, int]]:
    proc = harness.start_ingest(
        children, env.redis_url, label=f"ingest-{processes}", ingest_processes=processes
    )
    url = proc.url
    wrk.run(url + path, body, headers, wrk.WARMUP_SECONDS)
    time.sleep(1)  # requests cut off by the warm-up's end finish publishing
    env.flush()  # count only what the measured run queues
    cpu = harness.cpu_seconds(proc)
    result = wrk.run(url + path, body, headers)
    result.server_cpu_s = harness.cpu_seconds(proc) - cpu
    time.sleep(1)
    counted = queued_events(env)
    proc.stop()
    return result, counted


def cpu_ratio(relay: WrkResult, bare: WrkResult) -> float | None:
    """Bare CPU per request over the relay's: the ratio a busy shared machine blurs least."""
    mine, theirs = relay.as_dict(), bare.as_dict()
    if "server_cpu_us_per_request" not in mine or "server_cpu_us_per_request" not in theirs:
        return None
    return round(float(theirs["server_cpu_us_per_request"] / mine["server_cpu_us_per_request"]), 3)


def _compare(
    env: Env, children: procs.Children, path: str, body: bytes, headers: dict[str, str]
) -> tuple[WrkResult, WrkResult, tuple[int, int, int]]:
    say(f"  bare aiohttp handler: wrk {wrk.SECONDS} s on {path}")
    bare = _bare(children, path, body, headers)
    say(f"  relay serve: wrk {wrk.SECONDS} s on {path}")
    relay, counted = _relay(env, children, path, body, headers)
    return relay, bare, counted


def ingest_webhook(env: Env) -> dict[str, Any]:
    """Single signed events on /webhook."""
    body = orjson.dumps(track(1))
    headers = {
        "Content-Type": "application/json",
        "X-Signature": harness.signature(body),
    }
    with harness.bench_context(env, "ingest_webhook") as children:
        relay, bare, (queued, messages, depth) = _compare(env, children, "/webhook", body, headers)
    ratio = relay.rps / bare.rps if bare.rps else 0.0
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
        relay, bare, (queued, messages, depth) = _compare(env, children, "/v1/batch", body, headers)
    events_per_s = relay.rps * BATCH_EVENTS
    baseline = bare.rps * BATCH_EVENTS
    queue_ok = queued >= relay.ok * BATCH_EVENTS
    return {
        "name": "ingest_batch",
        "events_per_s": round(events_per_s, 1),
        "baseline_per_s": round(baseline, 1),
        "ratio": round(events_per_s / baseline, 3) if baseline else 0.0,
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
    runs: dict[int, tuple[WrkResult, tuple[int, int, int]]] = {}
    with harness.bench_context(env, "ingest_processes") as children:
        for processes in (1, 2):
            say(f"  relay serve --processes {processes}: wrk {wrk.SECONDS} s on /v1/batch")
            runs[processes] = _relay(env, children, "/v1/batch", body, headers, processes)
    (one, (one_queued, _, _)), (two, (two_queued, _, _)) = runs[1], runs[2]
    ratio = two.rps / one.rps if one.rps else 0.0
    queue_ok = one_queued >= one.ok * BATCH_EVENTS and two_queued >= two.ok * BATCH_EVENTS
    return {
        "name": "ingest_processes",
        "events_per_s": round(two.rps * BATCH_EVENTS, 1),
        "baseline_per_s": round(one.rps * BATCH_EVENTS, 1),
        "ratio": round(ratio, 3),
        "p99_ms": round(two.p99_ms, 2),
        "baseline_p99_ms": round(one.p99_ms, 2),
        "cores": len(os.sched_getaffinity(0)),
        "relay": two.as_dict(),
        "baseline": one.as_dict(),
        "answered_2xx": one.ok + two.ok,
        "non_2xx": one.non_2xx + two.non_2xx,
        "queued_events": one_queued + two_queued,
        "queue_check": queue_ok,
        "target": "2 processes >= 1.6 x 1 (batch events/s, same wrk)",
        "met": ratio >= 1.6 and queue_ok,
    }
