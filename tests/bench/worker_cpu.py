"""`python -m tests.bench.worker_cpu [events] [runs]`: the worker's CPU time per event.

Not one of `make bench`'s figures: a tool for profiling the worker. The events are queued
through one ingest while no worker runs; then `relay worker -c 4` drains them into the
sandbox (20 ms per request). Measured from the first command the sandbox accepts to the
last: the worker processes' CPU time (user + system, every process of its tree) per
delivered event, the drain rate, Redis's own CPU per delivered event and the Redis
commands per Celery message (INFO commandstats; the queue is full, so ingest sends
nothing meanwhile: both are the worker's doing). The machine's load
average is printed with each run: other engineers' suites share it.

`PROFILE=path.txt` samples the live worker with py-spy during the drain and prints where
its CPU went (tests.bench.profile); `MONITOR=1` counts the commands clients send, by name,
with Redis's MONITOR (which slows Redis: not for the CPU figure).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from relay import keys
from tests import procs
from tests.bench import harness, profile
from tests.bench.e2e import (
    BATCH,
    CONCURRENCY,
    LATENCY_MS,
    USERS,
    PeakRss,
    live_worker,
    role,
)
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView, blast
from tests.bench.payloads import batch_body, identify, track


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _started(worker: procs.Proc) -> list[int]:
    """The processes of the worker's tree that run: not a Celery worker still importing."""
    root = psutil.Process(worker.pid)
    return [
        p.pid for p in [root, *root.children(recursive=True)]
        if not role(p).startswith("celery") or p.num_threads() > 1
    ]  # fmt: skip


def _sum_cpu(pids: list[int]) -> float:
    return sum(_cpu(pid) for pid in pids)


def _queued(env: Env, events: int) -> None:
    client = env.redis()
    try:
        deadline = time.monotonic() + 60
        while int(client.get("relay:depth:ready") or 0) < events:
            if time.monotonic() > deadline:
                raise RuntimeError("events not queued")
            time.sleep(0.1)
    finally:
        client.close()


class _Monitor:
    """Counts the commands clients send (not those scripts run), by name, with MONITOR."""

    def __init__(self, env: Env) -> None:
        self.counts: Counter[str] = Counter()
        self._client = env.redis()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._client.monitor() as m:
            while not self._stop.is_set():
                try:
                    c = m.next_command()
                except Exception:
                    return
                if c.get("client_type") != "lua":
                    self.counts[c["command"].split(" ", 1)[0].upper()] += 1

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(5)
        return self.counts


def _wait_delivered(env: Env, count: int, worker: procs.Proc) -> None:
    deadline = time.monotonic() + 60
    while env.relay_stats().get("delivered", 0) < count:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up not delivered:\n{worker.tail()}")
        time.sleep(0.2)


def _runs(env: Env) -> int:
    client = env.redis()
    try:
        return sum(1 for _ in client.scan_iter("relay:run:*", count=1000))
    finally:
        client.close()


def run_once(env: Env, events: int) -> dict[str, Any]:
    """One drain of `events` tracks (after a warm-up of identifies)."""
    with harness.bench_context(env, "worker_cpu") as children:
        sandbox = SandboxView(procs.start_sandbox(children).url)
        sandbox.faults(latency_ms=LATENCY_MS)
        ingest = harness.start_ingest(children, env.redis_url).url
        identifies = [
            batch_body([identify(u) for u in range(start, min(start + BATCH, USERS))])
            for start in range(0, USERS, BATCH)
        ]
        warm = harness.start_relay_worker(children, env.redis_url, sandbox.url, label="warm")
        blast(ingest + "/v1/batch", identifies, CONCURRENCY)
        _wait_delivered(env, USERS, warm)
        warm.stop()
        sandbox.clear()
        bodies = [
            batch_body([track(i % USERS) for i in range(start, start + BATCH)])
            for start in range(0, events, BATCH)
        ]
        blast(ingest + "/v1/batch", bodies, CONCURRENCY)
        _queued(env, events)
        # The learned rate as a long run leaves it: the drain is the worker's, not slow start's.
        client = env.redis()
        client.hset(keys.ADAPTIVE_RATE, mapping={"rate": "10000", "phase": "avoid"})
        client.close()
        monitor = _Monitor(env) if os.environ.get("MONITOR") else None
        worker = harness.start_relay_worker(children, env.redis_url, sandbox.url)
        # From the first accepted command: the worker's start-up is not the figure.
        while sandbox.stats()["commands"] == 0:
            worker.check_alive()
            time.sleep(0.01)
        live = live_worker(worker)
        # The processes that run already: one still importing (the replay lane starts at a
        # lower CPU priority) would add its start-up to the CPU of delivery.
        started = _started(worker)
        runs_before = _runs(env)
        cpu0, stats0, t0 = _sum_cpu(started), harness.commandstats(env), time.monotonic()
        redis0 = harness.tree_cpu(env.redis_pid) if env.redis_pid else None
        live0 = _cpu(live)
        got0 = int(sandbox.stats()["commands"])
        spy_to = os.environ.get("PROFILE")
        spy = profile.Spy(live, Path(spy_to)) if spy_to else None
        with PeakRss(worker.pid) as rss:
            got = sandbox.wait_commands(events, timeout=300, stall=20, alive=worker.check_alive)
        cpu1, stats1, t1 = _sum_cpu(started), harness.commandstats(env), time.monotonic()
        redis1 = harness.tree_cpu(env.redis_pid) if env.redis_pid else None
        live1 = _cpu(live)
        messages = _runs(env) - runs_before
        trips = monitor.stop() if monitor else None
        if spy is not None:
            spy.stop()
        worker.stop()
    calls = harness.calls_between(stats0, stats1)
    delivered = got - got0
    cpu_us = (cpu1 - cpu0) / delivered * 1e6
    return {
        "delivered_commands": delivered,
        "measured_processes": len(started),
        "cpu_us_per_command": round(cpu_us, 1),
        "live_cpu_us_per_command": round((live1 - live0) / delivered * 1e6, 1),
        "commands_per_s": round(delivered / (t1 - t0), 1),
        "redis_cpu_us_per_command": (
            round((redis1 - redis0) / delivered * 1e6, 1)
            if redis0 is not None and redis1 is not None
            else None
        ),
        "messages": messages,
        "worker_rss_mb": round(rss.peak / 2**20, 1),
        "worker_rss_by_process_mb": rss.by_process,
        "redis_calls_per_message": round(sum(calls.values()) / max(messages, 1), 1),
        # Messages in flight at either end make the above approximate; this one is exact.
        "redis_calls_per_event": round(sum(calls.values()) / delivered, 2),
        "redis_calls": calls,
        "round_trips_per_message": (
            {k: round(v / max(messages, 1), 2) for k, v in trips.most_common()} if trips else None
        ),
        "loadavg": os.getloadavg(),
        "profile": profile.summary(Path(spy_to)).as_dict() if spy_to else None,
    }


def main() -> int:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    env = Env()
    try:
        for _ in range(runs):
            result = run_once(env, events)
            say(json.dumps({k: v for k, v in result.items() if k != "profile"}))
            print(json.dumps(result), flush=True)
            if result["profile"]:
                cpu = result["cpu_us_per_command"]
                print(profile.headline(result["profile"], cpu), flush=True)
                print(profile.render(result["profile"], cpu), flush=True)
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
