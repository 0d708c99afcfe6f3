"""`relay serve --processes N`: N ingest processes answer on one port, one that dies is
replaced, and SIGTERM, SIGINT (or the supervisor's own death) leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import requests

from tests.integration.conftest import (
    WRITE_KEY,
    OwnRedis,
    Sandbox,
    queued_items,
    relay_env,
    wait_for,
)
from tests.procs import Proc, free_port, wait_http

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


class Served:
    """A supervisor started with `relay serve --processes 2`."""

    def __init__(self, proc: Proc, url: str, port: int) -> None:
        self.proc, self.url, self.port = proc, url, port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children()

    def listeners(self) -> set[int]:
        """Pids of the children listening on the port."""
        out = set()
        for child in self.children():
            try:
                conns = child.net_connections(kind="tcp")
            except psutil.NoSuchProcess:  # a child that just died (the test may kill one)
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                out.add(child.pid)
        return out


@pytest.fixture
def served(redis_url: str, r: redis.Redis, tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    env = relay_env(redis_url, port=port)
    args = [sys.executable, "-m", "relay.ops.cli", "serve", "--processes", "2"]
    proc = Proc(args, env, tmp_path / "serve.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/livez", proc)
    served = Served(proc, url, port)
    try:
        wait_for(lambda: len(served.listeners()) == 2)
        yield served
    finally:
        proc.stop(signal.SIGKILL)  # the whole group: nothing outlives a failed test


def post(url: str, n: int) -> None:
    for i in range(n):
        # A new connection each time, so the kernel spreads them over the processes.
        answer = requests.post(
            url + "/v1/track",
            auth=AUTH,
            json={"userId": f"u{i}", "event": "E"},
            headers={"Connection": "close"},
        )
        assert answer.status_code == 200


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def test_two_processes_answer_on_one_port(served: Served, r: redis.Redis) -> None:
    assert len(served.listeners()) == 2
    post(served.url, 40)
    wait_for(lambda: len(queued_items(r)) == 40)


def test_the_supervisor_holds_none_of_the_relays_imports(served: Served) -> None:
    """It only watches its children: the relay, pydantic and click stay in them."""
    supervisor = psutil.Process(served.pid)
    assert supervisor.cmdline()[-1].endswith("relay/ops/keeper.py")
    assert "-S" in supervisor.cmdline()  # not even site-packages
    assert supervisor.memory_info().rss < 25 * 2**20
    child = served.children()[0].memory_info().rss
    assert child > 2 * supervisor.memory_info().rss


def test_a_dead_process_is_replaced(served: Served) -> None:
    first, _ = served.children()
    first.kill()
    wait_for(lambda: len(served.listeners()) == 2 and first.pid not in served.listeners())
    post(served.url, 10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_process_and_keeps_what_was_answered(
    served: Served, r: redis.Redis, sig: int
) -> None:
    post(served.url, 20)
    pids = [served.pid] + [c.pid for c in served.children()]
    served.proc.popen.send_signal(sig)  # started above
    assert served.proc.popen.wait(30) == 0
    wait_for(lambda: gone(pids))
    assert len(queued_items(r)) == 20


def test_no_process_outlives_a_killed_supervisor(served: Served) -> None:
    children = [c.pid for c in served.children()]
    served.proc.popen.kill()  # the supervisor alone, SIGKILL
    served.proc.popen.wait(10)
    wait_for(lambda: gone(children))
    with pytest.raises(requests.ConnectionError):  # nothing listens on the port any more
        requests.get(served.url + "/livez", timeout=2)


# --- relay worker: a live Celery worker, and one of the replay lane on demand -------------


def queues_of(process: psutil.Process) -> str:
    args = process.cmdline()
    return args[args.index("-Q") + 1]


def lanes_of(supervisor: psutil.Process) -> dict[str, psutil.Process]:
    """The supervisor's Celery workers by the queue each consumes."""
    found = {}
    for child in supervisor.children():
        try:
            found[queues_of(child)] = child
        except (psutil.NoSuchProcess, ValueError):  # one exiting, or not yet a worker
            continue
    return found


def test_relay_worker_runs_the_replay_lane_on_demand_in_an_idle_priority_process(
    redis_url: str, r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    tmp_path: Path,
) -> None:  # fmt: skip
    from relay.reasons import Reason
    from relay.state import deadletter

    env = relay_env(
        redis_url, churnzero_url=clean_sandbox.url + "/i", replay_nice=7, replay_idle_s=2
    )
    args = [sys.executable, "-m", "relay.ops.cli", "worker", "-n", f"sup-{os.getpid()}@%h"]
    proc = Proc(args, env, tmp_path / "worker.log").start()
    try:
        supervisor = psutil.Process(proc.pid)
        wait_for(lambda: proc.log.read_text(errors="replace").count('"consuming"') >= 1, 60)
        # No replay queued: the live worker alone.
        assert set(lanes_of(supervisor)) == {"relay"}
        ingest = start_ingest()
        track = {"userId": "u1", "event": "Live", "messageId": "live-1",
                 "properties": {"accountExternalId": "A", "contactExternalId": "C"}}  # fmt: skip
        assert requests.post(ingest + "/v1/track", auth=AUTH, json=track).status_code == 200
        wait_for(lambda: {c["eventName"] for c in clean_sandbox.commands()} >= {"Live"})
        assert set(lanes_of(supervisor)) == {"relay"}

        # A dead letter replayed into its lane: the lane's process starts, nicer, delivers
        # it, and exits once idle.
        item = {"id": "dead-1", "source": "api", "received_at": time.time(), "attempts": 3,
                "event": {**track, "type": "track", "event": "Replayed", "messageId": "dead-1",
                          "timestamp": "2026-11-29T10:00:00Z"}}  # fmt: skip
        entry = deadletter.new_entry(item, Reason.RETRIES_EXHAUSTED)
        deadletter.add(r, [entry])
        relay_cli = [sys.executable, "-m", "relay.ops.cli", "dlq", "replay", entry.id]
        subprocess.run(relay_cli, env=env, check=True, capture_output=True, timeout=60)
        wait_for(lambda: set(lanes_of(supervisor)) == {"relay", "relay.replay"}, 30)
        lanes = lanes_of(supervisor)
        own = supervisor.nice()
        assert lanes["relay"].nice() == own and lanes["relay.replay"].nice() == own + 7
        assert os.sched_getscheduler(lanes["relay"].pid) == os.SCHED_OTHER
        assert os.sched_getscheduler(lanes["relay.replay"].pid) == os.SCHED_IDLE
        wait_for(lambda: {c["eventName"] for c in clean_sandbox.commands()} >= {"Replayed"})
        wait_for(lambda: gone([lanes["relay.replay"].pid]), 60)
        assert set(lanes_of(supervisor)) == {"relay"}
        assert "replay worker process" not in proc.log.read_text(errors="replace")  # no failure

        # Asked again by the next replay.
        entry = deadletter.new_entry({**item, "id": "dead-2", "event": {
            **item["event"], "event": "Replayed again", "messageId": "dead-2"}},
            Reason.RETRIES_EXHAUSTED)  # fmt: skip
        deadletter.add(r, [entry])
        relay_cli[-1] = entry.id
        subprocess.run(relay_cli, env=env, check=True, capture_output=True, timeout=60)
        wait_for(lambda: {c["eventName"] for c in clean_sandbox.commands()} >= {"Replayed again"})
        children = [c.pid for c in supervisor.children()]
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(60) == 0
        wait_for(lambda: gone(children))
    finally:
        proc.stop(signal.SIGKILL)


def test_a_process_replaced_while_redis_is_down_answers_503(
    own_redis: OwnRedis, tmp_path: Path
) -> None:
    # `relay serve` stops at start without a Redis; its children, started again during an
    # outage, must not (five early deaths make the supervisor give up).
    url, client = own_redis()
    port = free_port()
    proc = Proc([sys.executable, "-m", "relay.ops.cli", "serve", "--processes", "2"],
                relay_env(url, port=port), tmp_path / "serve.log").start()  # fmt: skip
    served = Served(proc, f"http://127.0.0.1:{port}", port)
    try:
        wait_http(served.url + "/livez", proc)
        wait_for(lambda: len(served.listeners()) == 2)
        client.shutdown(nosave=True)
        first, _ = served.children()
        first.kill()
        wait_for(lambda: len(served.listeners()) == 2 and first.pid not in served.listeners())
        for _ in range(10):  # whichever process answers
            ready = requests.get(served.url + "/readyz", headers={"Connection": "close"})
            assert ready.status_code == 503
        proc.check_alive()
    finally:
        proc.stop(signal.SIGKILL)
