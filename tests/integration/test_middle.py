"""The middle layer in-process, against a real Redis (the test database) and the sandbox:
the shared throttle, ingest's group commit, dead-letter replay and a batch's delivery
under ChurnZero's faults. Parts are injected, never patched."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from relay import broker, deadletter, keys
from relay.delivery import Delivery
from relay.mapping import load_mapping
from relay.publisher import GroupCommit
from relay.reasons import Reason
from relay.settings import Settings
from relay.throttle import Throttle
from tests.conftest import free_port
from tests.integration.conftest import APP_KEY, Sandbox, queued_items, url_of

pytestmark = pytest.mark.integration


def event_item(rid: str, **event: Any) -> dict[str, Any]:
    ids = {"accountExternalId": "A", "contactExternalId": "C"}
    body = {"type": "track", "userId": "u", "event": rid, "timestamp": "2026-11-29T10:00:00Z",
            "properties": ids, **event}  # fmt: skip
    return {"id": rid, "source": "api", "received_at": time.time(), "attempts": 0, "event": body}


# --- the shared throttle ----------------------------------------------------------------


def test_failures_past_the_threshold_pause_every_worker_then_one_probe(r: redis.Redis) -> None:
    one, other = (
        Throttle(r, rate_limit_rps=0, outage_threshold=2),
        Throttle(r, rate_limit_rps=0, outage_threshold=2),
    )
    assert one.gate().go
    pause = one.report(successes=0, failures=2, retry_after_s=None)
    assert pause > 0
    assert not other.gate().go  # a pause set by one worker holds back the others
    r.delete(keys.PAUSE_UNTIL)  # the pause ran out
    probe = other.gate()
    assert probe.go and probe.probe
    assert not one.gate().go  # only one probe at a time
    other.report(successes=1, failures=0, retry_after_s=None)
    assert one.gate().go and not one.gate().probe


def test_retry_after_pauses_everyone_for_that_long(r: redis.Redis) -> None:
    throttle = Throttle(r, rate_limit_rps=0, outage_threshold=5)
    pause = throttle.report(successes=0, failures=0, retry_after_s=3)
    gate = throttle.gate()
    assert 2 < pause <= 3 and not gate.go and 2 < gate.wait_s <= 3


def test_the_rate_limit_spaces_requests_across_workers(r: redis.Redis) -> None:
    one, other = (Throttle(r, rate_limit_rps=10, outage_threshold=5) for _ in range(2))
    began = time.monotonic()
    first = one.reserve(3, max_wait_s=5)
    second = other.reserve(3, max_wait_s=5)
    between = time.monotonic() - began  # at most this long passed between the two
    assert isinstance(first, list) and isinstance(second, list)
    # 10 requests/s: slots 100 ms apart (delays are whole milliseconds) ...
    assert all(b - a >= 0.099 for a, b in itertools.pairwise(first))
    # ... whoever reserved them: the other worker's first slot comes after the last one.
    assert second[0] + between >= first[-1] + 0.099
    assert one.reserve(100, max_wait_s=0.2) != []  # what fits in the wait, not all


# --- group commit at ingest -------------------------------------------------------------


async def test_group_commit_gathers_concurrent_requests_into_few_messages(
    r: redis.Redis,
) -> None:
    counted: list[int] = []
    celery = broker.make_celery(Settings(), url_of(r))
    commit = GroupCommit(celery, flush_ms=20, message_events=500, after_publish=counted.append)
    try:
        await asyncio.gather(*(commit.submit([event_item(f"g{i}")]) for i in range(50)))
    finally:
        commit.close()
    assert sorted(i["id"] for i in queued_items(r)) == sorted(f"g{i}" for i in range(50))
    assert r.llen(keys.QUEUE) < 50 and sum(counted) == 50


async def test_group_commit_fails_the_requests_when_redis_is_away() -> None:
    celery = broker.make_celery(Settings(), f"redis://127.0.0.1:{free_port()}/0")
    commit = GroupCommit(celery, flush_ms=1, message_events=500)
    try:
        with pytest.raises(broker.QUEUE_ERRORS):
            await asyncio.wait_for(commit.submit([event_item("x")]), timeout=30)
    finally:
        commit.close()


# --- dead-letter replay -----------------------------------------------------------------


def test_replay_requeues_once_and_a_failed_publish_keeps_the_entries(r: redis.Redis) -> None:
    entries = [deadletter.new_entry(event_item(f"d{i}"), Reason.REJECTED) for i in range(3)]
    deadletter.add(r, entries)
    ids = [e.id for e in entries]

    def broken(_: list[dict[str, Any]]) -> None:
        raise ConnectionError("Redis went away mid-replay")

    with pytest.raises(ConnectionError):
        deadletter.replay(r, ids, broken)
    assert r.hlen(keys.DLQ_ENTRIES) == 3  # nothing lost, and replayable again
    published: list[dict[str, Any]] = []
    assert deadletter.replay(r, ids, published.extend) == 3
    assert deadletter.replay(r, ids, published.extend) == 0
    assert sorted(i["id"] for i in published) == ["d0", "d1", "d2"]
    assert all(i["attempts"] == 0 and i["replayed_from"] in ids for i in published)
    assert r.hlen(keys.DLQ_ENTRIES) == 0


# --- one batch against ChurnZero's faults -----------------------------------------------


@pytest.fixture
def delivery(r: redis.Redis, clean_sandbox: Sandbox) -> Iterator[Delivery]:
    settings = Settings(churnzero_url=clean_sandbox.url + "/i", churnzero_app_key=APP_KEY)
    found = Delivery(settings, r, load_mapping(None))
    yield found
    found.close()


def delayed_items(r: redis.Redis) -> list[dict[str, Any]]:
    return [i for m in r.zrange(keys.DELAYED, 0, -1) for i in orjson.loads(m)["items"]]


def test_a_5xx_defers_the_batch_with_an_attempt_counted(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=503)
    report = delivery.deliver([event_item("f0"), event_item("f1")], "m-5xx")
    assert report.delivered == 0 and report.retried == {"5xx": 2}
    assert sorted((i["id"], i["attempts"]) for i in delayed_items(r)) == [("f0", 1), ("f1", 1)]
    assert int(r.get(keys.DELAYED_EVENTS)) == 2


def test_a_4xx_dead_letters_with_the_answer(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=400)
    report = delivery.deliver([event_item("f2")], "m-4xx")
    assert report.dead == {"rejected": 1}
    [entry] = deadletter.list_entries(r)
    assert entry.status == 400 and entry.item["id"] == "f2"


def test_a_pause_in_force_sends_nothing_and_defers_past_it(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    delivery.throttle.report(successes=0, failures=0, retry_after_s=30)
    report = delivery.deliver([event_item("f3")], "m-paused")
    assert clean_sandbox.commands() == [] and report.retried == {"paused": 1}
    [(_, due)] = r.zrange(keys.DELAYED, 0, -1, withscores=True)
    assert due - time.time() >= 28  # past the pause, not at the next backoff
