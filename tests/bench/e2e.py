"""`e2e`: load -> one ingest -> Redis -> one relay worker -> the ChurnZero sandbox (20 ms
per request), against a naive pipeline (one Celery task and one POST per event) to the
same sandbox.

Throughput is commands the sandbox accepted over the time from the first send to the
last command's arrival, in `ROUNDS` rounds of a share of the events each on the same
processes: the figure is the median round's, so one round that other work on a shared
machine slowed does not make the figure. Latency is measured apart, at half that rate:
every track carries its send time in `properties.description`, and the sandbox's request
log says when each command arrived. Worker RSS is the peak of the sum over every process
of `relay worker`, across all of it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from relay import keys
from tests import procs
from tests.bench import harness, naive, profile
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView, blast, paced
from tests.bench.payloads import batch_body, identify, track

USERS = 1_000
EVENTS = 100_000
BATCH = 100
CONCURRENCY = 16
LATENCY_MS = 20
PACED_SECONDS = 15
ROUNDS = 3
# All of `relay worker`'s processes together, at their peak under the throughput load.
RSS_TARGET_MB = 120
NAIVE_EVENTS = 5_000
NAIVE_TIMEOUT_S = 60


def role(proc: psutil.Process) -> str:
    """What a process of a worker's tree is: `celery -Q <queues>`, or its command."""
    try:
        args = proc.cmdline()
    except psutil.Error:
        return "?"
    if "celery" in args and "-Q" in args:
        return f"celery -Q {args[args.index('-Q') + 1]}"
    if "celery" in args:
        return "celery"
    return " ".join(a.rsplit("/", 1)[-1] for a in args[:4])


class PeakRss:
    """Samples the resident memory of a process and all its children in the background;
    keeps the peak of their sum, and each process's share at that peak: its RSS, the
    file-backed part of it (shared libraries, counted again in every process that maps
    them) and its threads."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self._proc = psutil.Process(pid)
        self._every = every_s
        self._stop = threading.Event()
        self.peak = 0
        # "<pid> <role>" -> {"rss_mb", "file_mb", "threads"} at the peak
        self.by_process: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self._proc, *self._proc.children(recursive=True)]
                sizes = {p: p.memory_info() for p in procs}
                total = sum(m.rss for m in sizes.values())
                if total > self.peak:
                    self.peak = total
                    self.by_process = {
                        f"{p.pid} {role(p)}": {
                            "rss_mb": round(m.rss / 2**20, 1),
                            "file_mb": round(m.shared / 2**20, 1),
                            "threads": p.num_threads(),
                        }
                        for p, m in sizes.items()
                    }
            except psutil.Error:
                return
            self._stop.wait(self._every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _wait_delivered(env: Env, count: int, worker: procs.Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while env.relay_stats().get("delivered", 0) < count:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"identify warm-up not delivered in {timeout} s:\n{worker.tail()}")
        time.sleep(0.2)


def _last_arrival(requests: list[dict[str, Any]]) -> float:
    return max((r["t"] for r in requests if r["status"] == 200), default=0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)) - 1, 0)
    return ordered[rank]


def live_worker(worker: procs.Proc) -> int:
    """The pid of the Celery worker of the live queue under `relay worker`."""
    for p in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
        if role(p) in (f"celery -Q {keys.QUEUE}", f"celery -Q {keys.QUEUE},{keys.REPLAY_QUEUE}"):
            return int(p.pid)
    raise RuntimeError(f"no Celery worker of the {keys.QUEUE!r} queue under {worker.pid}")


def wait_started(worker: procs.Proc, timeout: float = 60) -> None:
    """Wait until every Celery worker under `worker` runs its threads: a worker still
    importing (the replay lane's starts at a lower CPU priority, so late on a busy
    machine) would add its start-up to the CPU measured for delivery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        try:
            tree = psutil.Process(worker.pid).children(recursive=True)
            celery = [
                p for p in [psutil.Process(worker.pid), *tree] if role(p).startswith("celery")
            ]
            if celery and all(p.num_threads() > 1 for p in celery):
                return
        except psutil.Error:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the Celery workers under {worker.pid} did not start in {timeout} s")


PROFILE_PATH = harness.RESULTS / "e2e-profile.txt"


def wall_profile(cpu_profile: Path) -> Path:
    """Where the wall-clock profile taken beside a CPU profile is written."""
    return cpu_profile.with_name(cpu_profile.stem + "-wall.txt")


def throughput(
    env: Env,
    ingest: str,
    sandbox: SandboxView,
    worker: procs.Proc,
    events: int = EVENTS,
    spy_to: Path | None = None,
    warm_up: bool = True,
) -> dict[str, Any]:
    """After a warm-up of identifies (unless this worker had it), `events` tracks blasted
    to ingest: delivered events/s from the first send to the last arrival, the worker's
    CPU per delivered event (every process of its tree) and Redis's calls per delivered
    event over that time (ingest's included: the same for any worker). With `spy_to`, the
    live Celery worker is profiled meanwhile (tests.bench.profile)."""
    if warm_up:
        say(f"  warm-up: {USERS:,} identifies")
        identifies = [
            batch_body([identify(u) for u in range(start, min(start + BATCH, USERS))])
            for start in range(0, USERS, BATCH)
        ]
        blast(ingest + "/v1/batch", identifies, CONCURRENCY)
        _wait_delivered(env, USERS, worker, timeout=60)
    sandbox.clear()
    bodies = [
        batch_body([track(i % USERS) for i in range(start, start + BATCH)])
        for start in range(0, events, BATCH)
    ]
    say(f"  throughput: {events:,} tracks in batches of {BATCH}, {CONCURRENCY} at a time")
    wait_started(worker)
    spies = (
        [profile.Spy(live_worker(worker), spy_to),
         profile.Spy(live_worker(worker), wall_profile(spy_to), wall=True)]
        if spy_to else []
    )  # fmt: skip
    redis_pid = env.redis_pid
    cpu0, calls0 = harness.tree_cpu(worker.pid), harness.commandstats(env)
    redis0 = harness.tree_cpu(redis_pid) if redis_pid else 0.0
    sent = blast(ingest + "/v1/batch", bodies, CONCURRENCY)
    got = sandbox.wait_commands(events, timeout=180, stall=20, alive=worker.check_alive)
    cpu = harness.tree_cpu(worker.pid) - cpu0
    redis_cpu = harness.tree_cpu(redis_pid) - redis0 if redis_pid else None
    calls = harness.calls_between(calls0, harness.commandstats(env))
    for spy in spies:
        spy.stop()
    last = _last_arrival(sandbox.requests_log())
    seconds = last - sent.started if last else 0.0
    return {
        "events": events,
        "delivered": got,
        "seconds": round(seconds, 3),
        "events_per_s": got / seconds if seconds > 0 else 0.0,
        "ingest_events_per_s": round(events / (sent.finished - sent.started), 1),
        "worker_cpu_us_per_event": round(cpu / got * 1e6, 1) if got else None,
        # Redis's own CPU (ingest's writes included, the same for any worker).
        "redis_cpu_us_per_event": (
            round(redis_cpu / got * 1e6, 1) if got and redis_cpu is not None else None
        ),
        "redis_calls_per_event": round(sum(calls.values()) / got, 2) if got else None,
        "redis_calls": calls,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "load": sent.as_dict(),
    }


def _latency(ingest: str, sandbox: SandboxView, worker: procs.Proc, rate: float) -> dict[str, Any]:
    sandbox.clear()
    counter = iter(range(10**9))

    def body() -> bytes:
        sent_at = f"{time.time():.6f}"
        return batch_body([track(next(counter) % USERS, description=sent_at) for _ in range(BATCH)])

    per_s = rate / BATCH
    say(f"  latency: {rate:,.0f} events/s ({per_s:.1f} requests/s) for {PACED_SECONDS} s")
    sent = paced(ingest + "/v1/batch", body, per_s, PACED_SECONDS)
    expected = sent.requests * BATCH
    got = sandbox.wait_commands(expected, timeout=120, stall=20, alive=worker.check_alive)
    requests = sandbox.requests_log()
    commands = sandbox.commands()
    arrivals = [r["t"] for r in requests if r["status"] == 200 for _ in range(r["commands"])]
    if len(arrivals) != len(commands):
        raise RuntimeError(f"request log has {len(arrivals)} commands, list {len(commands)}")
    delays = [
        (t - float(c["description"])) * 1000
        for t, c in zip(arrivals, commands, strict=True)
        if c.get("description")
    ]
    if not delays:
        raise RuntimeError("no command carried its send time")
    return {
        "rate_events_per_s": round(rate, 1),
        "sent_events": expected,
        "delivered": got,
        "p50_ms": round(_percentile(delays, 50), 1),
        "p90_ms": round(_percentile(delays, 90), 1),
        "p99_ms": round(_percentile(delays, 99), 1),
        "max_ms": round(max(delays), 1),
        "load": sent.as_dict(),
    }


def _naive(env: Env, children: procs.Children, sandbox: SandboxView) -> dict[str, Any]:
    proc_env = dict(
        os.environ,
        BENCH_REDIS_URL=env.redis_url,
        BENCH_SANDBOX_URL=sandbox.url,
        BENCH_APP_KEY=harness.APP_KEY,
    )
    worker = children.start(
        "naive-worker",
        [sys.executable, "-m", "celery", "-A", "tests.bench.naive", "worker", "-Q", naive.QUEUE,
         "--pool", "threads", "-c", "4", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-l", "WARNING", "-n", f"bench-naive-{os.getpid()}@%h"],
        proc_env,
    )  # fmt: skip
    app = naive.make_app(env.redis_url)
    sandbox.clear()
    events = [track(i % USERS, ids=True) for i in range(NAIVE_EVENTS + 20)]
    # An explicit connection, closed on leaving: a pooled one would linger on the database.
    with app.connection_for_write() as connection:
        producer = app.amqp.Producer(connection)
        # Warm-up: the worker is consuming once these arrived.
        for event in events[:20]:
            app.send_task(naive.TASK, args=[event], queue=naive.QUEUE, producer=producer)
        sandbox.wait_commands(20, timeout=60, stall=60, alive=worker.check_alive)
        sandbox.clear()
        say(f"  naive baseline: {NAIVE_EVENTS:,} tasks, one POST each")
        started = time.time()
        for event in events[20:]:
            app.send_task(naive.TASK, args=[event], queue=naive.QUEUE, producer=producer)
    got = sandbox.wait_commands(
        NAIVE_EVENTS, timeout=NAIVE_TIMEOUT_S, stall=10, alive=worker.check_alive
    )
    last = _last_arrival(sandbox.requests_log())
    seconds = last - started if last else 0.0
    worker.stop()
    return {
        "events": NAIVE_EVENTS,
        "delivered": got,
        "seconds": round(seconds, 3),
        "events_per_s": got / seconds if seconds > 0 else 0.0,
    }


def e2e(env: Env, events: int = EVENTS, spy: bool = False) -> dict[str, Any]:
    """Delivered events/s of the relay and of the naive pipeline, latency, worker RSS;
    with `spy`, a profile of the live worker under the throughput load."""
    with harness.bench_context(env, "e2e") as children:
        sandbox = SandboxView(procs.start_sandbox(children).url)
        sandbox.faults(latency_ms=LATENCY_MS)
        ingest = harness.start_ingest(children, env.redis_url).url
        worker = harness.start_relay_worker(children, env.redis_url, sandbox.url)
        with PeakRss(worker.pid) as rss:
            spy_to = PROFILE_PATH if spy else None
            rounds = []
            for n in range(ROUNDS):
                say(f"  round {n + 1} of {ROUNDS}")
                rounds.append(throughput(
                    env, ingest, sandbox, worker, events // ROUNDS,
                    spy_to if n == 0 else None, warm_up=n == 0,
                ))  # fmt: skip
            run = sorted(rounds, key=lambda r: float(r["events_per_s"]))[len(rounds) // 2]
            if not run["events_per_s"]:
                raise RuntimeError(f"nothing was delivered: {run}\n{worker.tail()}")
            latency = _latency(ingest, sandbox, worker, run["events_per_s"] / 2)
        relay_stats = env.relay_stats()
        worker.stop()
        naive_run = _naive(env, children, sandbox)
    events_per_s = run["events_per_s"]
    baseline = naive_run["events_per_s"]
    ratio = events_per_s / baseline if baseline else 0.0
    rss_mb = rss.peak / 2**20
    # Every event answered 200 must arrive: a fast relay that loses events meets nothing.
    complete = all(r["delivered"] >= r["events"] for r in rounds) and (
        latency["delivered"] >= latency["sent_events"]
    )
    met = (
        events_per_s >= 10_000
        and ratio >= 10
        and rss_mb <= RSS_TARGET_MB
        and latency["p99_ms"] <= 1000
        and complete
    )
    return {
        "name": "e2e",
        "events_per_s": round(events_per_s, 1),
        "baseline_per_s": round(baseline, 1),
        "ratio": round(ratio, 2),
        "p99_ms": latency["p99_ms"],
        "p50_ms": latency["p50_ms"],
        "worker_rss_mb": round(rss_mb, 1),
        "worker_rss_by_process": rss.by_process,
        "all_delivered": complete,
        "sandbox_latency_ms": LATENCY_MS,
        "throughput": run,
        "rounds_events_per_s": [round(r["events_per_s"], 1) for r in rounds],
        "latency": latency,
        "naive": naive_run,
        "relay_stats": relay_stats,
        "target": (
            f">= 10,000 events/s, >= 10x naive, worker RSS <= {RSS_TARGET_MB} MB, p99 <= 1 s"
        ),
        "met": met,
    }
