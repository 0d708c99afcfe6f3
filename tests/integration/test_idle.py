"""An idle `relay worker` (its supervisor and live worker; the replay lane runs on demand)
barely touches the CPU or Redis."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests import procs
from tests.integration.conftest import OwnRedis, relay_env, wait_for

pytestmark = pytest.mark.integration

WINDOW_S = 20


def _count_commands(monitor: object, counts: Counter[str], stop: threading.Event) -> None:
    # MONITOR shows commands run inside scripts too ("[0 lua]"): count what clients send.
    for line in monitor.listen():  # type: ignore[attr-defined]
        if stop.is_set():
            return
        if line.get("client_type") != "lua":
            counts[str(line["command"]).split(" ", 1)[0].upper()] += 1


def test_an_idle_relay_worker_makes_a_few_redis_commands_a_second(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    url, r = own_redis()
    children = procs.Children(tmp_path)
    env = relay_env(url, churnzero_url="http://127.0.0.1:9/i")
    worker = children.start("worker", [sys.executable, "-m", "relay.ops.cli", "worker"], env)
    try:
        wait_for(lambda: worker.log.read_text(errors="replace").count('"consuming"') >= 1, 60)
        tree = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
        # With no replay queued, the replay lane's process is not running.
        assert len(tree) == 2, [p.cmdline() for p in tree]
        counts: Counter[str] = Counter()
        stop = threading.Event()
        with r.monitor() as monitor:
            threading.Thread(
                target=_count_commands, args=(monitor, counts, stop), daemon=True
            ).start()
            cpu = [sum(p.cpu_times()[:2]) for p in tree]
            began = time.monotonic()
            time.sleep(WINDOW_S)  # the window measured, not a wait for progress
            elapsed = time.monotonic() - began
            used = sum(sum(p.cpu_times()[:2]) for p in tree) - sum(cpu)
            stop.set()
            r.ping()  # one more line for the monitor to wake on
        per_s = sum(counts.values()) / elapsed
        print(f"\nidle relay worker: {per_s:.1f} commands/s {dict(counts)}, "
              f"{100 * used / elapsed:.2f} % of a core")  # fmt: skip
        assert per_s <= 8, counts
        assert used / elapsed < 0.02
    finally:
        children.stop_all()
