"""Redis down under a running ingest: a quick 503 with Retry-After (Segment's webhook gives
up after 5-10 s, and a slow answer counts as a failure anyway), no 200 for events not in
Redis, and 200 again once Redis is back."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.integration.conftest import (
    WRITE_KEY,
    Senders,
    cut_all,
    queued_items,
    sign,
    wait_for,
)
from tests.procs import free_port, start_redis

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
# Ingest costs at most one 1 s connect timeout per answer while Redis is down (docs/operations.md,
# runbook "Redis down"); generous, so that a machine twice as slow passes too.
BOUND_S = 5
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


class Poster(Senders):
    """Threads posting numbered track events, one to /webhook and one to /v1/batch at a
    time, recording every answer and which events a 200 acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        # began, ended, status (0: no answer), Retry-After
        self.answers: list[tuple[float, float, int, str | None]] = []
        self.acked: set[str] = set()
        self._lock = threading.Lock()
        self._next = 0
        super().__init__(
            [threading.Thread(target=self._run, args=(route,)) for route in ("webhook", "batch")]
        )

    def _ids(self, n: int) -> list[str]:
        with self._lock:
            start, self._next = self._next, self._next + n
        return [f"e-{i}" for i in range(start, start + n)]

    def _post(self, session: requests.Session, route: str, ids: list[str]) -> requests.Response:
        events = [{"type": "track", "userId": "u", "event": "E", "messageId": i} for i in ids]
        if route == "webhook":
            body = json.dumps(events[0]).encode()
            headers = {"Content-Type": "application/json", "X-Signature": sign(body)}
            return session.post(self.url + "/webhook", data=body, headers=headers, timeout=60)
        return session.post(self.url + "/v1/batch", auth=AUTH, json={"batch": events}, timeout=60)

    def _run(self, route: str) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            ids = self._ids(1 if route == "webhook" else 10)
            began = time.monotonic()
            try:
                answer = self._post(session, route, ids)
                status, retry_after = answer.status_code, answer.headers.get("Retry-After")
            except requests.RequestException:
                status, retry_after = 0, None
            with self._lock:
                self.answers.append((began, time.monotonic(), status, retry_after))
                if status == 200:
                    self.acked.update(ids)

    def since(self, moment: float) -> list[tuple[float, float, int, str | None]]:
        """The answers to requests sent after `moment`."""
        with self._lock:
            return [a for a in self.answers if a[0] > moment]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A redis-server of the test's own with AOF `always` (a restart keeps what it took)."""
    port = free_port()
    held: dict[str, Any] = {"port": port, "dir": tmp_path / "redis"}
    held["server"] = start_redis(port, held["dir"], *AOF_ALWAYS)
    yield held
    server: subprocess.Popen[bytes] = held["server"]
    if server.poll() is None:
        server.terminate()
        server.wait(10)


class Vanishing:
    """A TCP proxy in front of a Redis that can vanish like a host gone from the network:
    its connections cut and every new connect timing out (its listener stops accepting,
    and a one-slot accept queue, full, drops every SYN), never refused."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._filler: socket.socket | None = None
        self._vanished, self._idle, self._closed = (threading.Event() for _ in range(3))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            if self._vanished.is_set():
                self._idle.set()
                self._closed.wait(0.01)
                continue
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def vanish(self) -> None:
        """Connects time out from now on, then the live connections are cut: the port
        never refuses."""
        self._idle.clear()
        self._vanished.set()
        assert self._idle.wait(5), "the proxy did not stop accepting"
        # A connect the kernel completed just before is still queued: cut it too, or it
        # would hang ingest's client until its read timeout.
        with contextlib.suppress(TimeoutError):
            while True:
                self._listener.accept()[0].close()
        self._listener.listen(0)
        self._filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        with self._lock:
            conns, self._conns = self._conns, []
        cut_all(conns)

    def restore(self) -> None:
        """Take connections again."""
        if self._filler is not None:
            self._filler.close()
            self._filler = None
        self._listener.listen(128)
        self._vanished.clear()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        if self._filler is not None:
            self._filler.close()


def timed_get(url: str) -> tuple[float, int]:
    began = time.monotonic()
    status = requests.get(url, timeout=60).status_code
    return time.monotonic() - began, status


@pytest.mark.parametrize("how", ["stopped", "unreachable"])
def test_redis_down_answers_503_fast_loses_nothing_and_recovers(
    private_redis: dict[str, Any], start_ingest: Callable[..., str], how: str
) -> None:
    """`stopped`: redis-server stopped, connections refused, then started again from its
    AOF. `unreachable`: connects to Redis time out, then go through again."""
    port = private_redis["port"]
    r = redis.Redis(port=port)
    proxy = Vanishing(port) if how == "unreachable" else None
    url = start_ingest(redis_url=f"redis://127.0.0.1:{proxy.port if proxy else port}/0")
    poster = Poster(url).start()
    try:
        wait_for(lambda: len(poster.acked) >= 200, timeout=60)
        if proxy is not None:
            proxy.vanish()
        else:
            private_redis["server"].terminate()
            private_redis["server"].wait(10)
        down_from = time.monotonic()

        # /readyz turns 503 at once, every answer within the bound.
        while True:
            took, status = timed_get(url + "/readyz")
            assert took < BOUND_S, f"/readyz took {took:.1f} s"
            if status == 503:
                break
            assert time.monotonic() - down_from < BOUND_S, "/readyz still 200 with Redis down"
        # Both routes have been refused a few times each, and quickly.
        wait_for(lambda: sum(1 for a in poster.since(down_from) if a[2] == 503) >= 20, 60)
        down_to = time.monotonic()
        during = [a for a in poster.answers if a[1] > down_from and a[0] < down_to]
        slowest = max(ended - began for began, ended, *_ in during)
        assert slowest < BOUND_S, f"an answer took {slowest:.1f} s with Redis down"
        refused = [a for a in during if a[0] > down_from]
        assert {status for _, _, status, _ in refused} == {503}
        assert all(retry_after for *_, retry_after in refused)

        if proxy is not None:
            proxy.restore()
        else:
            private_redis["server"] = start_redis(port, private_redis["dir"], *AOF_ALWAYS)
        back = time.monotonic()
        wait_for(lambda: any(a[2] == 200 for a in poster.since(back)), 30)
        assert timed_get(url + "/readyz")[1] == 200
    finally:
        poster.stop()
        if proxy is not None:
            proxy.close()

    # Every event answered 200 is in the queue (no worker runs: nothing left it).
    queued = {item["event"]["messageId"] for item in queued_items(r)}
    missing = poster.acked - queued
    assert not missing, f"{len(missing)} acknowledged events are not in Redis"
    r.close()
