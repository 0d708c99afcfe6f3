"""TLS: a redis-server that speaks only TLS, with a CA the test makes and client
certificates required; ingest and a worker deliver through it, and a relay that does not
trust the CA is refused instead of connecting unverified."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import make_certs
from tests.integration.conftest import WRITE_KEY, Sandbox, Starter, relay_env, wait_for
from tests.procs import free_port

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


class TLSRedis:
    """A TLS-only redis-server on loopback and the relay settings that reach it."""

    def __init__(self, workdir: Path) -> None:
        self.certs = make_certs(workdir / "certs")
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.certs["server.crt"]),
             "--tls-key-file", str(self.certs["server.key"]),
             "--tls-ca-cert-file", str(self.certs["ca.crt"]),
             "--tls-auth-clients", "yes", "--dir", str(workdir), "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.settings = {
            "redis_url": self.url,
            "redis_tls_ca_file": self.certs["ca.crt"],
            "redis_tls_cert_file": self.certs["client.crt"],
            "redis_tls_key_file": self.certs["client.key"],
        }
        self.client = redis.Redis.from_url(
            self.url,
            ssl_ca_certs=str(self.certs["ca.crt"]),
            ssl_certfile=str(self.certs["client.crt"]),
            ssl_keyfile=str(self.certs["client.key"]),
            socket_timeout=2,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server with TLS did not start (built without TLS?)")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path)
    yield server
    server.stop()


def _track(i: int) -> dict[str, object]:
    return {"type": "track", "userId": "tls-user", "event": "Over TLS", "messageId": f"tls-{i}",
            "properties": {"accountExternalId": "A1", "contactExternalId": "C1",
                           "description": f"tls-{i}"}}  # fmt: skip


def test_ingest_and_worker_deliver_through_tls(
    tls_redis: TLSRedis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:  # fmt: skip
    url = start_ingest(**tls_redis.settings)
    start_worker(**tls_redis.settings)
    answer = requests.post(
        url + "/v1/batch", auth=AUTH, json={"batch": [_track(i) for i in range(20)]}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    commands = clean_sandbox.wait_commands(20, timeout=30)
    assert sorted(c["description"] for c in commands) == sorted(f"tls-{i}" for i in range(20))
    # The relay's own state went over TLS to that server, not anywhere else.
    wait_for(lambda: int(tls_redis.client.hget("relay:stats", "delivered") or 0) >= 20)


def test_a_relay_that_does_not_trust_the_ca_refuses_to_start(
    tls_redis: TLSRedis, tmp_path: Path
) -> None:
    # Client certificate given, CA not: the server's certificate must fail verification
    # against the system's CAs. `relay serve` checks Redis before it listens, so it stops
    # with one line naming the failure rather than acknowledging anything.
    settings = {**tls_redis.settings, "write_keys": WRITE_KEY}
    del settings["redis_tls_ca_file"]
    env = relay_env(settings.pop("redis_url"), **settings)
    env["RELAY_PORT"] = str(free_port())
    out = subprocess.run(
        [sys.executable, "-m", "relay.ops.cli", "serve"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CERTIFICATE_VERIFY_FAILED" in lines[0], out.stderr
    assert tls_redis.client.llen("relay") == 0
