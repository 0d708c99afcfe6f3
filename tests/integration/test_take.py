"""Taking a message off the queue: no moment where it lives only in a socket or in a
worker's memory, and a dead worker's messages go to the others within its lease.

A TCP proxy in front of Redis cuts a worker's connection right after Redis answered a take
(BRPOP, BLMOVE, the take script) with a message, so the reply never arrives: the message
was popped, and only Redis can still have it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from tests.integration.conftest import OwnRedis, Sandbox, Starter, cut_all, wait_for
from tests.integration.test_chaos import Load, delivered, identify, record

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

# A take's command, as the client writes it (RESP): kombu's BRPOP, the relay's BLMOVE
# (BRPOPLPUSH before Redis 7) and its take script for several queues.
_TAKES = (b"\r\nBRPOP\r\n", b"\r\nBLMOVE\r\n", b"\r\nBRPOPLPUSH\r\n")
_TAKE_SCRIPT = b"RPOPLPUSH"
# A take's empty answer (RESP2 and RESP3 nulls): passed on.
_EMPTY = (b"*-1\r\n", b"$-1\r\n", b"_\r\n")


class TakeCut:
    """A TCP proxy in front of a Redis that drops a connection, instead of passing on the
    answer, when Redis answers a take with a message: `cuts` times, then passes all."""

    def __init__(self, target_port: int, cuts: int) -> None:
        self._target = target_port
        self.cuts_left = cuts
        self.cut = 0
        self.refusing = False  # after a cut, refuse new connections too
        self.refuse_after_cut = False
        self.swallow = False  # drop the answer but keep the connection open
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            state = {"taking": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if any(t in data for t in _TAKES) or (
                    b"\r\nEVAL\r\n" in data and _TAKE_SCRIPT in data
                ):
                    state["taking"] = True
                dst.sendall(data)
        cut_all([src, dst])

    def _down(self, src: socket.socket, dst: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if state["taking"]:
                    state["taking"] = False
                    with self._lock:
                        cut = self.cuts_left > 0 and not data.startswith(_EMPTY)
                        if cut:
                            self.cuts_left -= 1
                            self.cut += 1
                            self.refusing = self.refuse_after_cut
                    if cut and self.swallow:
                        continue  # the answer vanishes; the connection stays up
                    if cut:
                        break  # Redis popped it; the answer never reaches the worker
                dst.sendall(data)
        cut_all([src, dst])

    def admit(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        cut_all(conns)


def nothing_left(r: redis.Redis) -> bool:
    """No message anywhere: queues, unacked, the delayed set, any worker's taken list."""
    taken = sum(r.llen(k) for k in r.scan_iter("relay:worker:*:taken"))
    return (
        r.llen("relay") == 0 and r.llen("relay.replay") == 0 and r.hlen("unacked") == 0
        and r.zcard("relay:delayed") == 0 and taken == 0
    )  # fmt: skip


def all_or_nothing_left(r: redis.Redis, sandbox: Sandbox, want: set[str]) -> Callable[[], bool]:
    """Every event delivered, or nothing left that could still deliver one (then the
    promise is checked and fails with the count lost)."""
    return lambda: want <= set(delivered(sandbox)) or nothing_left(r)


# Ten messages of ten events: a cut message is a tenth of the load. The tracks wait for
# their identify as long as it takes: the cut message may be the identify's.
SMALL_MESSAGES = {"message_events": 10, "identity_wait_s": 600}
# A killed worker may have sent, unrecorded, what its threads held: 4 threads x 10 events.
KILLED_BOUND = 4 * 10


def _load(url: str) -> Load:
    load = Load([url], 100, batch=10, threads=1).start()
    load.join()
    assert len(load.acked) == 100
    return load


@pytest.mark.timeout(300)
def test_take_answer_lost_on_the_wire_loses_nothing(
    own_redis: OwnRedis, clean_sandbox: Sandbox,
    start_ingest: Callable[..., str], start_worker: Starter,
) -> None:  # fmt: skip
    url_redis, r = own_redis()
    proxy = TakeCut(int(r.connection_pool.connection_kwargs["port"]), cuts=3)
    try:
        url = start_ingest(redis_url=url_redis, **SMALL_MESSAGES)
        identify(url)
        load = _load(url)
        worker = start_worker(redis_url=f"redis://127.0.0.1:{proxy.port}/0", **SMALL_MESSAGES)
        wait_for(all_or_nothing_left(r, clean_sandbox, load.acked), timeout=120)
        assert proxy.cut == 3, "the fault did not happen"
        figures = record(
            "take answer lost on the wire (3 cuts)",
            load,
            delivered(clean_sandbox),
            r,
            duplicate_bound=0,
        )
        assert figures["dead_lettered"] == 0
        assert "Connection to broker lost" in worker.log.read_text(errors="replace")
    finally:
        proxy.close()


@pytest.mark.timeout(300)
def test_worker_killed_while_its_connection_is_down_loses_nothing(
    own_redis: OwnRedis, clean_sandbox: Sandbox,
    start_ingest: Callable[..., str], start_worker: Starter,
) -> None:  # fmt: skip
    url_redis, r = own_redis()
    proxy = TakeCut(int(r.connection_pool.connection_kwargs["port"]), cuts=1)
    proxy.refuse_after_cut = True  # the worker cannot reconnect: its connection is down
    try:
        url = start_ingest(redis_url=url_redis, **SMALL_MESSAGES)
        identify(url)
        load = _load(url)
        victim = start_worker(redis_url=f"redis://127.0.0.1:{proxy.port}/0", **SMALL_MESSAGES)
        wait_for(lambda: proxy.cut == 1, timeout=60)
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        start_worker(redis_url=url_redis, **SMALL_MESSAGES)
        wait_for(all_or_nothing_left(r, clean_sandbox, load.acked), timeout=120)
        recovered_s = round(time.monotonic() - killed_at, 1)
        got = delivered(clean_sandbox)
        name = "worker SIGKILLed while its connection is down"
        figures = record(
            name, load, got, r, duplicate_bound=KILLED_BOUND, all_delivered_after_kill_s=recovered_s
        )
        assert figures["dead_lettered"] == 0
    finally:
        proxy.close()


@pytest.mark.timeout(300)
def test_take_answer_that_never_comes_loses_nothing(
    own_redis: OwnRedis, clean_sandbox: Sandbox,
    start_ingest: Callable[..., str], start_worker: Starter,
) -> None:  # fmt: skip
    url_redis, r = own_redis()
    proxy = TakeCut(int(r.connection_pool.connection_kwargs["port"]), cuts=1)
    proxy.swallow = True  # a half-open link: kombu's health check drops it after a while
    try:
        url = start_ingest(redis_url=url_redis, **SMALL_MESSAGES)
        identify(url)
        load = _load(url)
        start_worker(redis_url=f"redis://127.0.0.1:{proxy.port}/0", **SMALL_MESSAGES)
        # kombu drops a take unanswered for its health check interval (30 s) and more.
        wait_for(all_or_nothing_left(r, clean_sandbox, load.acked), timeout=180)
        assert proxy.cut == 1, "the fault did not happen"
        record(
            "take answer never arrives (half-open link)",
            load,
            delivered(clean_sandbox),
            r,
            duplicate_bound=0,
        )
    finally:
        proxy.close()
