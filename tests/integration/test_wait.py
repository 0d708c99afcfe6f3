"""RELAY_REDIS_WAIT_REPLICAS: ingest answers 200 only once a replica holds the events.

A primary and a replica of our own (redis-server on loopback). A replica paused with
SIGSTOP holds the answer back until it resumes; a replica gone makes ingest answer 503.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.integration.conftest import WRITE_KEY, wait_for
from tests.procs import free_port, start_redis

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
BATCH = {"batch": [{"type": "track", "userId": "w", "event": "Waited", "messageId": f"w-{i}"}
                   for i in range(10)]}  # fmt: skip


class Pair:
    """A primary and its replica, each a redis-server process."""

    def __init__(self, workdir: Path) -> None:
        self.primary_port, self.replica_port = free_port(), free_port()
        self.primary = start_redis(
            self.primary_port, workdir / "p", "--repl-diskless-sync-delay", "0"
        )
        self.replica = start_redis(
            self.replica_port, workdir / "r", "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        self.url = f"redis://127.0.0.1:{self.primary_port}/0"
        self.on_replica = redis.Redis(port=self.replica_port)
        wait_for(lambda: self.on_replica.info("replication")["master_link_status"] == "up")

    def stop(self) -> None:
        self.on_replica.close()
        for proc in (self.replica, self.primary):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    servers = Pair(tmp_path)
    yield servers
    servers.stop()


def test_ingest_answers_once_the_replica_has_the_events(
    pair: Pair, start_ingest: Callable[..., str]
) -> None:
    url = start_ingest(redis_url=pair.url, redis_wait_replicas=1, redis_wait_timeout_ms=10_000)
    pair.replica.send_signal(signal.SIGSTOP)  # the replica takes nothing until resumed
    began = time.monotonic()
    resume = threading.Timer(0.5, pair.replica.send_signal, args=(signal.SIGCONT,))
    resume.start()
    try:
        answer = requests.post(url + "/v1/batch", auth=AUTH, json=BATCH, timeout=15)
    finally:
        resume.join()
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - began >= 0.5, "answered before the replica could have it"
    assert pair.on_replica.llen("relay") >= 1


def test_without_a_replica_ingest_answers_503(pair: Pair, start_ingest: Callable[..., str]) -> None:
    url = start_ingest(redis_url=pair.url, redis_wait_replicas=1, redis_wait_timeout_ms=200)
    pair.replica.terminate()
    pair.replica.wait(10)
    answer = requests.post(url + "/v1/batch", auth=AUTH, json=BATCH, timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"]
    assert "could not queue" in answer.json()["error"]
