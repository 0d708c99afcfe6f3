"""Throttling, retries, dead letters and duplicates, against the sandbox's fault injection
and real workers: lose nothing, hammer nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
import redis
import requests

from tests.integration.conftest import (
    ROOT,
    WRITE_KEY,
    Sandbox,
    Starter,
    relay_env,
    settled,
    url_of,
    wait_for,
)

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


def identify_then_tracks(url: str, n: int, prefix: str = "ev") -> None:
    """One identify, then n tracks in batches of 100, each with its own messageId."""
    requests.post(url + "/v1/identify", auth=AUTH, json={
        "userId": "u1", "messageId": f"{prefix}-identify",
        "traits": {"accountExternalId": "A", "contactExternalId": "C"},
    }).raise_for_status()  # fmt: skip
    for start in range(0, n, 100):
        batch = [
            {"type": "track", "userId": "u1", "event": "E", "messageId": f"{prefix}-{i}",
             "properties": {"description": f"{prefix}-{i}"}}
            for i in range(start, min(start + 100, n))
        ]  # fmt: skip
        requests.post(url + "/v1/batch", auth=AUTH, json={"batch": batch}).raise_for_status()


def tracked(sandbox: Sandbox) -> list[str]:
    return [c["description"] for c in sandbox.commands() if c["action"] == "trackEvent"]


@pytest.fixture
def ingest(r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str]) -> str:
    return start_ingest()


# The first four share a worker and ingest (the `relay_url` fixture, see SharedRelay): each
# ends with its work done. The others start workers of their own.


def test_503_for_a_while_then_everything_once(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=503)
    identify_then_tracks(relay_url, 300)
    # Down until the worker has met it, however long the worker took to start.
    wait_for(lambda: clean_sandbox.answered(503))
    clean_sandbox.clear_faults()
    wait_for(lambda: len(tracked(clean_sandbox)) >= 300 and settled(r), timeout=90)
    got = tracked(clean_sandbox)
    assert sorted(got) == sorted(f"ev-{i}" for i in range(300))  # each exactly once
    assert r.hlen("relay:dlq:entries") == 0


def test_400_dead_letters_then_replay_delivers_once(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=400)
    identify_then_tracks(relay_url, 5)
    wait_for(lambda: r.zcard("relay:dlq:reason:rejected") == 5 and settled(r))
    entry = json.loads(next(iter(r.hvals("relay:dlq:entries"))))
    assert entry["status"] == 400 and entry["reason"] == "rejected"
    assert entry["response"]
    assert tracked(clean_sandbox) == []
    clean_sandbox.reset()
    env = relay_env(url_of(r))
    replay = [sys.executable, "-m", "relay.ops.cli", "dlq", "replay", "--reason", "rejected"]
    out = subprocess.run(replay, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "replayed 5 of 5" in out.stdout
    again = subprocess.run(replay, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "replayed 0 of 0" in again.stdout  # safe to run twice
    wait_for(lambda: len(tracked(clean_sandbox)) >= 5 and settled(r))
    time.sleep(0.5)
    assert sorted(tracked(clean_sandbox)) == sorted(f"ev-{i}" for i in range(5))
    assert r.hlen("relay:dlq:entries") == 0


def test_same_message_id_twice_is_delivered_once(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    identify_then_tracks(relay_url, 20, prefix="dup")
    identify_then_tracks(relay_url, 20, prefix="dup")  # Segment library retrying
    wait_for(lambda: len(tracked(clean_sandbox)) >= 20 and settled(r))
    time.sleep(0.5)
    assert sorted(tracked(clean_sandbox)) == sorted(f"dup-{i}" for i in range(20))
    assert int(r.hget("relay:stats", "skipped:duplicate")) == 21


@pytest.mark.usefixtures("relay_url")
def test_a_batch_the_worker_cannot_handle_is_dead_lettered_not_dropped(
    r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    from relay.settings import Settings
    from relay.state import broker

    # Items without the relay's id: nothing ingest writes, but a message in the queue all
    # the same (another producer, a hand-edited replay). Celery would drop a failed one.
    event = {"type": "track", "userId": "u1", "event": "E", "messageId": "no-id-1"}
    celery = broker.make_celery(Settings(), url_of(r))
    broker.send(celery, [{"source": "api", "event": event}, {"event": event}])
    wait_for(lambda: r.zcard("relay:dlq:reason:worker_error") == 2 and settled(r))
    entries = [json.loads(v) for v in r.hvals("relay:dlq:entries")]
    assert [e["item"]["event"] for e in entries] == [event, event]
    assert all(e["errors"][0].startswith("DecodeError: no relay id") for e in entries)
    assert tracked(clean_sandbox) == []


def test_429_retry_after_holds_every_worker(
    ingest: str, r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    start_worker()
    start_worker()
    identify_then_tracks(ingest, 10, prefix="warm")
    wait_for(lambda: len(tracked(clean_sandbox)) == 10, timeout=20)
    clean_sandbox.reset()
    clean_sandbox.fault(status=429, retry_after=3)
    identify_then_tracks(ingest, 400, prefix="t")
    wait_for(lambda: clean_sandbox.answered(429))  # a worker met it: over for later requests
    clean_sandbox.clear_faults()
    wait_for(lambda: len(tracked(clean_sandbox)) >= 400 and settled(r), timeout=40)
    log = clean_sandbox.requests_log()
    first_429 = min(x["t"] for x in log if x["status"] == 429)
    # Requests already on the wire when the first 429 came back may land just after it;
    # nothing may be *sent* inside the window that follows.
    inside = [x for x in log if first_429 + 0.25 < x["t"] < first_429 + 3.0]
    assert inside == []
    assert sorted(tracked(clean_sandbox)) == sorted(f"t-{i}" for i in range(400))
    assert r.hlen("relay:dlq:entries") == 0


def test_long_outage_few_probes_bounded_memory_full_drain(
    ingest: str, r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    worker = start_worker()
    clean_sandbox.fault(drop_connection=True)
    identify_then_tracks(ingest, 5000, prefix="o")
    # The circuit opens after a few failures: measure from then, however long that took.
    wait_for(lambda: r.exists("relay:throttle:trips") == 1, timeout=30)
    proc = psutil.Process(worker.pid)
    rss = []
    probes_start = len(clean_sandbox.requests_log())
    t0 = time.monotonic()
    while time.monotonic() - t0 < 12:  # the outage watched for 12 s: a length, not a wait
        rss.append(proc.memory_info().rss)
        time.sleep(1)
    during = len(clean_sandbox.requests_log()) - probes_start
    # ~12 s of outage: with pauses doubling to 30 s, a handful of probes at most.
    assert during <= 6, during
    assert max(rss) < 250 * 1024 * 1024
    clean_sandbox.clear_faults()  # back: the next probe finds it so
    wait_for(lambda: len(tracked(clean_sandbox)) >= 5000 and settled(r), timeout=90)
    assert sorted(tracked(clean_sandbox)) == sorted(f"o-{i}" for i in range(5000))
    assert r.hlen("relay:dlq:entries") == 0


def test_retries_stop_at_max_age_into_dead_letters(
    ingest: str, r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    start_worker(max_age_s=3, outage_threshold=1000)
    # The worker is up before the events arrive: their 3 s of age are spent retrying, not
    # waiting for a worker that a busy machine starts slowly.
    identify_then_tracks(ingest, 1, prefix="warm")
    wait_for(lambda: tracked(clean_sandbox) == ["warm-0"] and settled(r), timeout=60)
    clean_sandbox.fault(status=503)
    identify_then_tracks(ingest, 3)
    wait_for(lambda: r.zcard("relay:dlq:reason:retries_exhausted") == 3 and settled(r), timeout=60)
    entries = [json.loads(v) for v in r.hvals("relay:dlq:entries")]
    assert {e["status"] for e in entries} == {503}
    assert all(e["attempts"] >= 2 for e in entries)
    # The age counts from receipt; the first failure came a little later.
    assert all(e["last_failure"] - e["item"]["received_at"] >= 3 for e in entries)
    assert all(e["item"]["received_at"] <= e["first_failure"] < e["last_failure"] for e in entries)
    assert tracked(clean_sandbox) == ["warm-0"]
