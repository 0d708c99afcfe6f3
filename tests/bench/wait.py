"""`ingest_wait`: the cost of RELAY_REDIS_WAIT_REPLICAS=1, measured in one run.

A primary and a replica of our own (redis-server, AOF everysec, loopback); `relay serve`
on the primary with WAIT off, then with WAIT 1, each loaded by the same wrk on
`/v1/batch` (100 events per request). The ratio is WAIT 1 over WAIT off. After the WAIT
run the replica's own `relay:depth:ready` counter must cover every event answered 200.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from tests import procs
from tests.bench import harness, wrk
from tests.bench.harness import Env, say
from tests.bench.payloads import basic_auth, batch_body, track

BATCH_EVENTS = 100
AOF = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")


def _redis_server(children: procs.Children, label: str, port: int, *extra: str) -> redis.Redis:
    workdir = harness.RESULTS / "logs" / f"wait-{label}"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = children.start(
        label,
        [procs.redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
         str(workdir), *AOF, "--repl-diskless-sync-delay", "0", *extra],
    )  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=10)
    deadline = time.monotonic() + 10
    while True:
        proc.check_alive()
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {label} did not start") from None
            time.sleep(0.05)


def _measure(
    children: procs.Children, url: str, primary: redis.Redis, replicas: int
) -> tuple[wrk.WrkResult, int]:
    body = batch_body([track(i) for i in range(BATCH_EVENTS)])
    headers = {"Content-Type": "application/json", "Authorization": basic_auth()}
    proc = harness.start_ingest(
        children, url, label=f"ingest-wait{replicas}", redis_wait_replicas=replicas
    )
    wrk.run(proc.url + "/v1/batch", body, headers, wrk.WARMUP_SECONDS)
    time.sleep(1)  # requests cut off by the warm-up's end finish publishing
    primary.flushdb()
    say(f"  relay serve, RELAY_REDIS_WAIT_REPLICAS={replicas}: wrk {wrk.SECONDS} s")
    result = wrk.run(proc.url + "/v1/batch", body, headers)
    time.sleep(1)
    proc.stop()
    return result, int(primary.get("relay:depth:ready") or 0)


def ingest_wait(env: Env) -> dict[str, Any]:
    """/v1/batch with WAIT 1 against the same with WAIT off, on a primary and a replica."""
    del env  # this benchmark brings its own primary and replica
    children = harness.children_of("ingest_wait")
    try:
        primary_port, replica_port = procs.free_port(), procs.free_port()
        primary = _redis_server(children, "primary", primary_port)
        replica = _redis_server(
            children, "replica", replica_port, "--replicaof", "127.0.0.1", str(primary_port)
        )
        while replica.info("replication").get("master_link_status") != "up":
            time.sleep(0.1)
        url = f"redis://127.0.0.1:{primary_port}/0"
        plain, _ = _measure(children, url, primary, 0)
        waited, depth = _measure(children, url, primary, 1)
        replica_depth = int(replica.get("relay:depth:ready") or 0)
    finally:
        children.stop_all()
    events_per_s = waited.rps * BATCH_EVENTS
    baseline = plain.rps * BATCH_EVENTS
    replicated_ok = replica_depth >= waited.ok * BATCH_EVENTS
    ratio = events_per_s / baseline if baseline else 0.0
    return {
        "name": "ingest_wait",
        "events_per_s": round(events_per_s, 1),
        "baseline_per_s": round(baseline, 1),
        "ratio": round(ratio, 3),
        "p99_ms": round(waited.p99_ms, 2),
        "baseline_p99_ms": round(plain.p99_ms, 2),
        "p50_ms": round(waited.p50_ms, 2),
        "baseline_p50_ms": round(plain.p50_ms, 2),
        "relay": waited.as_dict(),
        "baseline": plain.as_dict(),
        "answered_2xx": waited.ok,
        "non_2xx": waited.non_2xx,
        "queued_events": depth,
        "replica_depth_ready": replica_depth,
        "replica_check": replicated_ok,
        "target": "reported, not a goal: WAIT 1 over WAIT off (replica holds every 200)",
        "met": replicated_ok and waited.non_2xx == 0,
    }
