"""Sentinel failover under load, with real processes on loopback.

A primary and a replica (redis-server, AOF on), three sentinels, ingest and a worker
delivering to the sandbox, all through a sentinel:// URL. Under load the primary is
SIGKILLed; Sentinel promotes the replica, and the killed node comes back as a replica
(as a supervisor would restart it). Asserted: while no primary answered, ingest never
answered 200; delivery resumes through the same relay processes; with
RELAY_REDIS_WAIT_REPLICAS=1 every event answered 200 is delivered or dead-lettered.
Without WAIT the events lost with the primary are counted, not asserted: that is the
window asynchronous replication leaves. Figures go to bench-results/failover.json.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from redis.sentinel import Sentinel

from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    Senders,
    Starter,
    relay_env,
    wait_for,
)
from tests.procs import ROOT, free_port, start_redis, start_sentinel

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]
MASTER = "relay-primary"
AUTH = (WRITE_KEY, "")
ADMIN_TOKEN = "failover-admin"
VISIBILITY_S = 25  # an unacked message comes back after this (the worker's time limit: 10)
AOF = ("--appendonly", "yes", "--appendfsync", "everysec")
RESULTS = ROOT / "bench-results" / "failover.json"


def _role(port: int) -> str:
    with redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
        return str(client.execute_command("ROLE")[0], "ascii")


class Topology:
    """A primary, a replica and three sentinels, each a redis-server process."""

    def __init__(self, workdir: Path, *, synced: bool = True) -> None:
        self.workdir, self.synced = workdir, synced
        self.primary_port, self.replica_port = free_port(), free_port()
        # synced: no delay before the first sync, the replica is a full copy within a
        # second. Not synced: the primary holds the first sync back for a minute, so the
        # replica is known to Sentinel but holds nothing (a replica just (re)attached).
        delay = "0" if synced else "60"
        self.primary = start_redis(
            self.primary_port, workdir / "a", *AOF, "--repl-diskless-sync-delay", delay
        )
        self.replica = start_redis(
            self.replica_port, workdir / "b", *AOF, "--repl-diskless-sync-delay", "0",
            "--replicaof", "127.0.0.1", str(self.primary_port),
        )  # fmt: skip
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = [
            start_sentinel(port, workdir / f"s{port}", MASTER, self.primary_port)
            for port in self.sentinel_ports
        ]
        self.url = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports) + "/0"
        # Sentinels that know the replica and each other can elect a leader and promote.
        wait_for(self._ready, timeout=60)

    def _ready(self) -> bool:
        with redis.Redis(port=self.replica_port, socket_timeout=1) as replica:
            link = replica.info("replication")
            copied = link.get("master_link_status") == "up" and not link.get(
                "master_sync_in_progress"
            )
            if copied != self.synced:
                return False
        for port in self.sentinel_ports:
            with redis.Redis(port=port, socket_timeout=1) as s:
                state = s.sentinel_master(MASTER)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
        return True

    def primary_client(self) -> redis.Redis:
        """A client of whichever node is primary now (asked of the sentinels)."""
        sentinels = Sentinel([("127.0.0.1", p) for p in self.sentinel_ports], socket_timeout=2)
        client: redis.Redis = sentinels.master_for(MASTER, socket_timeout=5)
        return client

    def rejoin_old_primary(self) -> None:
        """Restart the killed node as a replica of the promoted one, with its own AOF."""
        self.primary = start_redis(
            self.primary_port, self.workdir / "a", *AOF, "--repl-diskless-sync-delay", "0",
            "--replicaof", "127.0.0.1", str(self.replica_port),
        )  # fmt: skip

    def stop(self) -> None:
        for proc in [*self.sentinels, self.primary, self.replica]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinels, self.primary, self.replica]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def topology(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Topology]:
    topo = Topology(tmp_path, synced=request.param == "synced")
    yield topo
    topo.stop()


class Load(Senders):
    """Numbered track events posted in batches by two threads until stopped (bounded)."""

    def __init__(self, url: str, batch: int = 20, limit: int = 100_000) -> None:
        self.url, self.batch, self.limit = url, batch, limit
        self.answers: list[tuple[float, float, int, list[str]]] = []  # start, end, status, ids
        self._next = 0
        self._lock = threading.Lock()
        super().__init__([threading.Thread(target=self._run) for _ in range(2)])

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                if self._next >= self.limit:
                    return
                first, self._next = self._next, self._next + self.batch
            ids = [f"f-{i}" for i in range(first, first + self.batch)]
            body = {"batch": [
                {"type": "track", "userId": "fo", "event": "Failover", "messageId": i,
                 "properties": {"accountExternalId": "A", "contactExternalId": "C",
                                "description": i}}
                for i in ids
            ]}  # fmt: skip
            began = time.monotonic()
            try:
                status = session.post(self.url + "/v1/batch", auth=AUTH, json=body, timeout=30)
                code = status.status_code
            except requests.RequestException:
                code = 0
            with self._lock:
                self.answers.append((began, time.monotonic(), code, ids))
            if code != 200:
                time.sleep(0.05)  # a client backs off a little, as Segment's do

    def acked(self, after: float = 0.0) -> set[str]:
        with self._lock:
            return {i for began, _, code, ids in self.answers if code == 200 and began > after
                    for i in ids}  # fmt: skip


class RoleWatch:
    """Polls the replica's ROLE: when it was last seen a replica, when first a primary."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last_replica = 0.0
        self.promoted = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.promoted:
            try:
                role = _role(self.port)
            except (redis.RedisError, OSError):
                role = "?"
            now = time.monotonic()
            if role == "slave":
                self.last_replica = now
            elif role == "master":
                self.promoted = now
            time.sleep(0.02)


def _offset(port: int, field: str) -> int:
    with redis.Redis(port=port, socket_timeout=2) as client:
        return int(client.info("replication")[field])


def _delivered(sandbox: Sandbox) -> set[str]:
    return {c["description"] for c in sandbox.commands() if c["action"] == "trackEvent"}


def _dead_lettered(r: redis.Redis) -> set[str]:
    out = set()
    for raw in r.hvals("relay:dlq:entries"):
        event = json.loads(raw)["item"].get("event", {})
        out.add(str(event.get("properties", {}).get("description")))
    return out


def _accounted(topology: Topology, sandbox: Sandbox, acked: set[str]) -> set[str]:
    with topology.primary_client() as r:
        return acked & (_delivered(sandbox) | _dead_lettered(r))


def _record(name: str, figures: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing.setdefault(name, []).append(figures)
    RESULTS.write_text(json.dumps(existing, indent=2))
    print(f"\n{name}: {figures}")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("topology", ["synced", "first-sync"], indirect=True)
@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
def test_primary_sigkill_under_load(
    wait_replicas: int, topology: Topology, clean_sandbox: Sandbox,
    start_ingest: Callable[..., str], start_worker: Starter,
) -> None:  # fmt: skip
    settings = {
        "redis_url": topology.url,
        "redis_master": MASTER,
        "redis_wait_replicas": wait_replicas,
        "visibility_timeout_s": VISIBILITY_S,
        "task_time_limit_s": 10,
        "admin_token": ADMIN_TOKEN,
    }
    url = start_ingest(**settings)
    worker = start_worker(**settings)
    load = Load(url).start()
    try:
        if wait_replicas and not topology.synced:
            # No replica holds anything: WAIT confirms nothing and ingest must refuse.
            wait_for(lambda: len(load.answers) >= 10, timeout=30)
            assert not load.acked(), "acknowledged while no replica held anything"
        else:
            wait_for(lambda: len(load.acked()) >= 2_000, timeout=60)
            wait_for(lambda: len(clean_sandbox.commands()) >= 500, timeout=60)
        watch = RoleWatch(topology.replica_port)
        sent = _offset(topology.primary_port, "master_repl_offset")
        killed = time.monotonic()
        topology.primary.send_signal(signal.SIGKILL)
        topology.primary.wait(10)
        # What the replica had not received when its primary died (a lower bound).
        behind = max(sent - _offset(topology.replica_port, "slave_repl_offset"), 0)
        wait_for(lambda: watch.promoted > 0, timeout=60)
        topology.rejoin_old_primary()
        # Ingest and delivery resume through the same processes; then ChurnZero fails
        # for a second, sending batches through the delayed set and the mover. (What is
        # waited for is delivery, not more load: the load may have reached its bound.)
        wait_for(lambda: len(load.acked(after=watch.promoted)) >= 200, timeout=90)
        before = len(clean_sandbox.commands())
        wait_for(lambda: len(clean_sandbox.commands()) >= before + 200, timeout=90)
        clean_sandbox.fault(status=503, for_s=1)
        faulted = len(clean_sandbox.commands())
        wait_for(lambda: len(clean_sandbox.commands()) >= faulted + 200, timeout=90)
    finally:
        load.stop()
    assert worker.popen.poll() is None, "the worker died"

    acked = load.acked()
    stopped = time.monotonic()
    accounted, changed = _accounted(topology, clean_sandbox, acked), stopped
    # Until all are accounted for, or nothing moved for three visibility timeouts (an
    # unacked message comes back after one, once a worker's periodic sweep finds it):
    # what is missing then is lost.
    while accounted != acked and time.monotonic() - changed < 3 * VISIBILITY_S:
        time.sleep(1)
        now = _accounted(topology, clean_sandbox, acked)
        if now != accounted:
            accounted, changed = now, time.monotonic()
    lost = acked - accounted
    settled_s = round(time.monotonic() - stopped, 1)
    with topology.primary_client() as r:
        leftovers = {"queued": r.llen("relay"), "unacked": r.hlen("unacked"),
                     "delayed": r.zcard("relay:delayed")}  # fmt: skip
        stats = {str(k, "utf-8"): int(v) for k, v in r.hgetall("relay:stats").items()}
    retried = sum(n for name, n in stats.items() if name.startswith("retried:"))
    # The operator's tools reach the new primary too: the CLI and the admin API.
    cli = subprocess.run(
        [sys.executable, "-m", "relay.ops.cli", "status", "--json"],
        env=relay_env(topology.url, redis_master=MASTER), cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    admin = requests.get(
        url + "/admin/api/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )

    # No primary: the old one dead, the replica not yet promoted. No 200 may come from then.
    blind = [code for began, end, code, _ in load.answers
             if began > killed and end < watch.last_replica]  # fmt: skip
    lost_ends = [end for _, end, code, ids in load.answers if code == 200 and set(ids) & lost]
    first_200_after = min(
        (end for began, end, code, _ in load.answers if code == 200 and began > killed),
        default=float("nan"),
    )
    figures = {
        "wait_replicas": wait_replicas,
        "acknowledged": len(acked),
        "acknowledged_after_promotion": len(load.acked(after=watch.promoted)),
        "lost": len(lost),
        "lost_sample": sorted(lost, key=lambda i: int(i[2:]))[:3],
        "lost_acknowledged_ms_before_kill": sorted(
            round((killed - end) * 1000, 1) for end in lost_ends
        ),
        "replica_behind_bytes_at_kill": behind,
        "load_ran_s": round(stopped - killed, 1),
        "accounted_after_s": settled_s,
        "promoted_after_ms": round((watch.promoted - killed) * 1000),
        "first_200_after_kill_ms": round((first_200_after - killed) * 1000),
        "answers_without_primary": {str(c): blind.count(c) for c in sorted(set(blind))},
        "left_in_redis": leftovers,
        "retried_after_promotion": retried,
    }
    replica = "replica in sync" if topology.synced else "replica on its first sync"
    _record(f"primary SIGKILL, {replica}, RELAY_REDIS_WAIT_REPLICAS={wait_replicas}", figures)
    assert cli.returncode == 0 and "depth" in json.loads(cli.stdout), cli.stderr
    assert admin.status_code == 200, admin.text
    assert retried > 0, f"no batch went through the delayed set: {stats}"
    assert blind, "no request fell between the kill and the promotion: nothing was checked"
    assert 200 not in blind, f"ingest answered 200 while no primary was reachable: {figures}"
    if wait_replicas:
        assert not lost, f"{len(lost)} acknowledged events lost: {sorted(lost)[:10]} {figures}"
