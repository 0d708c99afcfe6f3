"""`archive`: the flight recorder's cost, archive on against archive off in the same run.

Each round is e2e's throughput load (a warm-up of identifies, then tracks blasted to one
ingest, delivered by one `relay worker` into the sandbox at 20 ms per request), once with
RELAY_ARCHIVE on (the worker records every settlement, and its archiver child writes the
files to a directory of the round's own) and once off, alternated, so the machine's load
falls on both alike. Reported: the median of each round's on/off ratio of delivered
events/s (target >= 0.9), and the archive's bytes on disk per archived event once the
archiver has caught up (target <= 150 B, the commands included), with how long it took
to catch up after the last delivery.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests import procs
from tests.bench import harness
from tests.bench.e2e import LATENCY_MS, PeakRss, throughput
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView

ROUNDS = 5
EVENTS = 30_000


def _archived(env: Env, worker: procs.Proc, timeout: float = 120) -> float:
    """Wait until the archiver has written every record; the seconds it took."""
    began = time.monotonic()
    client = env.redis()
    try:
        while client.xlen("relay:archive"):
            worker.check_alive()
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"the archiver did not catch up in {timeout} s")
            time.sleep(0.1)
    finally:
        client.close()
    return time.monotonic() - began


def _round(env: Env, on: bool, events: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="relay-bench-archive-"))
    try:
        with harness.bench_context(env, "archive") as children:
            sandbox = SandboxView(procs.start_sandbox(children).url)
            sandbox.faults(latency_ms=LATENCY_MS)
            ingest = harness.start_ingest(children, env.redis_url).url
            settings = {"archive": on, "archive_dir": str(folder)}
            worker = harness.start_relay_worker(
                children, env.redis_url, sandbox.url, label="worker", **settings
            )
            with PeakRss(worker.pid) as rss:
                run = throughput(env, ingest, sandbox, worker, events)
                catch_up_s = _archived(env, worker) if on else 0.0
            stats = env.relay_stats()
            worker.stop()
        files = list(folder.rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        archived = stats.get("archived", 0)
        return {
            "archive": on,
            "events_per_s": round(run["events_per_s"], 1),
            "worker_cpu_us_per_event": run["worker_cpu_us_per_event"],
            "worker_rss_mb": round(rss.peak / 2**20, 1),
            "rss_by_process_mb": rss.by_process,
            "archived": archived,
            "files": len(files),
            "bytes": size,
            "bytes_per_event": round(size / archived, 1) if archived else None,
            "catch_up_s": round(catch_up_s, 2),
            "loadavg_1m": run["loadavg_1m"],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def archive(env: Env, rounds: int = ROUNDS, events: int = EVENTS) -> dict[str, Any]:
    """Delivered events/s with the archive on and off, alternated; disk per event."""
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for n in range(rounds):
        # Which goes first alternates too: a machine getting busier favours neither.
        order = (True, False) if n % 2 == 0 else (False, True)
        pair = {}
        for on in order:
            say(f"  round {n + 1}/{rounds}: archive {'on' if on else 'off'}")
            pair[on] = _round(env, on, events)
        runs.append((pair[True], pair[False]))
    ratios = [on["events_per_s"] / off["events_per_s"] for on, off in runs if off["events_per_s"]]
    ratio = statistics.median(ratios) if ratios else 0.0
    per_event = [on["bytes_per_event"] for on, _ in runs if on["bytes_per_event"]]
    bytes_per_event = statistics.median(per_event) if per_event else None
    complete = all(on["archived"] >= events for on, _ in runs)
    return {
        "name": "archive",
        "events_per_s": statistics.median(on["events_per_s"] for on, _ in runs),
        "baseline_per_s": statistics.median(off["events_per_s"] for _, off in runs),
        "ratio": round(ratio, 3),
        "ratios": [round(r, 3) for r in ratios],
        "bytes_per_event": bytes_per_event,
        "catch_up_s": max(on["catch_up_s"] for on, _ in runs),
        "all_archived": complete,
        "rounds": [{"on": on, "off": off} for on, off in runs],
        "target": "archive on / off >= 0.9 events/s, <= 150 B on disk per archived event",
        "met": ratio >= 0.9 and bytes_per_event is not None and bytes_per_event <= 150 and complete,
    }
