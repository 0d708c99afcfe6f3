"""The benchmarks' real parts: a Redis database of their own, child processes, and results.

Every child (started by tests.procs, as the integration tests start theirs) runs in its
own process group and is killed with it when its benchmark ends, whether it ended well
or not. The benchmark database (`RELAY_BENCH_REDIS_DB`, default 14) is flushed before
and after each benchmark and no other database is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tests import procs
from tests.procs import ROOT

RESULTS = ROOT / "bench-results"
LOGS = RESULTS / "logs"
# Engineers sharing one Redis give each their own database.
DB = int(os.environ.get("RELAY_BENCH_REDIS_DB", "14"))
SECRET = "bench-webhook-secret"
WRITE_KEY = "bench-write-key"
APP_KEY = "bench-app-key"


def say(message: str) -> None:
    """Progress on stderr, so stdout keeps only the results table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def children_of(bench: str) -> procs.Children:
    """The child processes of one benchmark, logging to bench-results/logs/<bench>-*.log."""
    return procs.Children(LOGS, f"{bench}-")


class Env:
    """Where the benchmarks run: the Redis URL of the benchmark database.

    By default the benchmarks start a Redis of their own with AOF and `appendfsync
    everysec`, the durable setting docs/reliability.md recommends, so that a 200 costs what it
    costs in a deployment. `RELAY_BENCH_REDIS=shared` uses the machine's Redis on 6379 as
    it is configured (its persistence is recorded with each result).
    """

    def __init__(self) -> None:
        self._own: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        shared = os.environ.get("RELAY_BENCH_REDIS", "aof") == "shared"
        if shared and procs.redis_answers("127.0.0.1", 6379):
            port = 6379
        else:
            port = procs.free_port()
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-bench-redis-")
            say(f"starting {procs.redis_binary()} on port {port}, AOF appendfsync everysec")
            self._own = procs.start_redis(
                port, Path(self._tmp.name), "--appendonly", "yes", "--appendfsync", "everysec"
            )
        self.redis_url = f"redis://127.0.0.1:{port}/{DB}"
        self.persistence = self._persistence()

    def _persistence(self) -> str:
        """What a 200 waits for on this Redis: `aof everysec`, `aof always`, or `none`."""
        client = self.redis()
        try:
            aof = client.config_get("appendonly").get("appendonly")
            fsync = client.config_get("appendfsync").get("appendfsync")
        finally:
            client.close()
        return f"aof {fsync}" if aof == "yes" else "no aof"

    def redis(self) -> redis.Redis:
        """A client of the benchmark database."""
        return redis.Redis.from_url(self.redis_url, socket_timeout=30)

    def flush(self) -> None:
        """Empty the benchmark database (only that one)."""
        client = self.redis()
        try:
            client.flushdb()
        finally:
            client.close()

    def relay_stats(self) -> dict[str, int]:
        """The relay's deployment counters (`relay:stats`): delivered, skipped, requests..."""
        client = self.redis()
        try:
            raw = client.hgetall("relay:stats")
        finally:
            client.close()
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}

    def strangers(self) -> int:
        """Clients of other programs connected to the benchmark database right now."""
        client = self.redis()
        try:
            me = client.client_id()
            return sum(
                1 for c in client.client_list() if int(c.get("db", -1)) == DB and c["id"] != str(me)
            )
        finally:
            client.close()

    def close(self) -> None:
        if self._own is not None:
            self._own.terminate()
            self._own.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()


def relay_env(redis_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a relay process: the bench database and credentials.

    Everything else keeps the relay's defaults, so the figures are those of a
    deployment configured as shipped.
    """
    return procs.relay_env(
        redis_url, webhook_secret=SECRET, write_keys=WRITE_KEY, churnzero_app_key=APP_KEY,
        **settings,
    )  # fmt: skip


def start_ingest(
    children: procs.Children, redis_url: str, label: str = "ingest", **settings: Any
) -> procs.Proc:
    """`relay serve` on a free port, once it answers (its base URL is `.url`)."""
    # One ingest process unless asked: the per-process figures are the ones compared.
    settings.setdefault("ingest_processes", 1)
    proc = procs.start_ingest(children, relay_env(redis_url, **settings), label)
    _wait_listening(proc, int(settings["ingest_processes"]))
    return proc


def _wait_listening(proc: procs.Proc, count: int, timeout: float = 60) -> None:
    """Wait until `count` ingest processes listen: the first one answering says nothing
    of the others, and a connection made before one listens never reaches it."""
    if count <= 1:
        return
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        listening = 0
        for child in psutil.Process(proc.pid).children():
            try:
                tcp = child.net_connections(kind="tcp")
            except psutil.Error:
                continue
            listening += any(c.status == psutil.CONN_LISTEN for c in tcp)
        if listening >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{count} ingest processes did not all listen in {timeout} s")


def start_relay_worker(
    children: procs.Children, redis_url: str, sandbox_url: str, label: str = "worker",
    **settings: Any,
) -> procs.Proc:  # fmt: skip
    """`relay worker` as an operator runs it (a live and a replay Celery worker, threads
    pool, 4 threads each) delivering to the sandbox."""
    env = relay_env(redis_url, churnzero_url=sandbox_url + "/i", log_level="WARNING", **settings)
    name = f"bench-{label}-{os.getpid()}@%h"
    return children.start(
        label,
        [
            sys.executable,
            "-m",
            "relay.ops.cli",
            "worker",
            "-c",
            "4",
            "--without-heartbeat",
            "-n",
            name,
        ],
        env,
    )


def http_json(method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
    """A small blocking JSON request (sandbox control and inspection)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# --- results ---------------------------------------------------------------------------


def write_result(result: dict[str, Any]) -> Path:
    """bench-results/<name>.json"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


@contextlib.contextmanager
def bench_context(env: Env, name: str) -> Iterator[procs.Children]:
    """A benchmark's lifetime: database flushed before and after, children stopped."""
    others = env.strangers()
    if others:
        # Someone else's FLUSHDB or consumer would skew the counts: say so, loudly.
        say(f"WARNING: {others} other client(s) use Redis database {DB}; figures may be off")
    env.flush()
    children = children_of(name)
    try:
        yield children
    finally:
        children.stop_all()
        env.flush()


def signature(body: bytes) -> str:
    """The X-Signature Segment sends for this body."""
    from relay.ingest.auth import signature as hmac_sha1

    return hmac_sha1(SECRET, body)


def cpu_seconds(proc: procs.Proc) -> float:
    """CPU time (user + system) the process has used so far."""
    import psutil

    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)
