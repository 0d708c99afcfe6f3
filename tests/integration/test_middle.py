"""The middle layer in-process, against a real Redis (the test database): the shared
throttle, ingest's group commit and dead-letter replay. Parts are injected (a Redis
behind a proxy that can refuse, a publish function), never patched; a batch's delivery
is in test_middle_delivery, claims and the delayed-set mover in test_claims."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

import pytest
import redis

from relay import keys
from relay.delivery.throttle import FIRST_OUTAGE_PAUSE_S, Throttle
from relay.ingest.publisher import ConfirmedPublisher, GroupCommit
from relay.reasons import Reason
from relay.settings import Settings
from relay.state import broker, deadletter, redis_conn
from tests.integration.conftest import Blip, event_item, queued_items, url_of
from tests.procs import free_port

pytestmark = pytest.mark.integration


# --- the shared throttle ----------------------------------------------------------------


def test_failures_past_the_threshold_pause_every_worker_then_one_probe(r: redis.Redis) -> None:
    one, other = (
        Throttle(r, rate_limit_rps=0, outage_threshold=2),
        Throttle(r, rate_limit_rps=0, outage_threshold=2),
    )
    assert one.permit().go
    pause = one.report(successes=0, failures=2, retry_after_s=None)
    assert pause > 0
    assert not other.permit().go  # a pause set by one worker holds back the others
    r.delete(keys.PAUSE_UNTIL)  # the pause ran out
    probe = other.permit()
    assert probe.go and probe.probe
    assert not one.permit().go  # only one probe at a time
    other.report(successes=1, failures=0, retry_after_s=None)
    assert one.permit().go and not one.permit().probe


def test_a_failed_probe_doubles_the_pause_and_a_good_one_ends_the_outage(
    r: redis.Redis,
) -> None:
    throttle = Throttle(r, rate_limit_rps=0, outage_threshold=2, adaptive=False)
    # Each pause is counted on Redis's clock from the report that set it: exact.
    assert throttle.report(successes=0, failures=2, retry_after_s=None) == FIRST_OUTAGE_PAUSE_S
    r.delete(keys.PAUSE_UNTIL)  # the pause ran out
    assert throttle.permit().probe
    assert throttle.report(successes=0, failures=1, retry_after_s=None) == 2 * FIRST_OUTAGE_PAUSE_S
    r.delete(keys.PAUSE_UNTIL)
    assert throttle.permit().probe
    assert throttle.report(successes=1, failures=0, retry_after_s=None) == 0
    permit = throttle.permit()
    assert permit.go and not permit.probe
    # The next outage starts again from the first pause.
    assert throttle.report(successes=0, failures=2, retry_after_s=None) == FIRST_OUTAGE_PAUSE_S


def test_retry_after_pauses_everyone_for_that_long(r: redis.Redis) -> None:
    throttle = Throttle(r, rate_limit_rps=0, outage_threshold=5)
    pause = throttle.report(successes=0, failures=0, retry_after_s=3)
    permit = throttle.permit()
    assert 2 < pause <= 3 and not permit.go and 2 < permit.wait_s <= 3


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
    client = redis_conn.async_client(Settings(), url_of(r))
    publisher = ConfirmedPublisher(broker.AsyncQueue(client, message_events=500), r)
    commit = GroupCommit(publisher.publish, flush_ms=20, message_events=500)
    try:
        await asyncio.gather(*(commit.submit([event_item(f"g{i}")]) for i in range(50)))
    finally:
        await commit.close()
        await client.aclose()
    assert sorted(i["id"] for i in queued_items(r)) == sorted(f"g{i}" for i in range(50))
    assert r.llen(keys.QUEUE) < 50 and int(r.get(keys.DEPTH_READY) or 0) == 50


async def test_group_commit_fails_the_requests_when_redis_is_away() -> None:
    away = f"redis://127.0.0.1:{free_port()}/0"
    client = redis_conn.async_client(Settings(), away)
    acker = redis.Redis.from_url(away)
    publisher = ConfirmedPublisher(broker.AsyncQueue(client, message_events=500), acker)
    commit = GroupCommit(publisher.publish, flush_ms=1, message_events=500)
    try:
        with pytest.raises(broker.QUEUE_ERRORS):
            await asyncio.wait_for(commit.submit([event_item("x")]), timeout=30)
    finally:
        await commit.close()
        await client.aclose()
        acker.close()


async def test_group_commit_fails_every_request_of_a_refused_group_then_recovers(
    r: redis.Redis,
) -> None:
    # Ingest's own path: the pipelined writer and ingest's client (one reconnect at once),
    # on a Redis behind a proxy that can refuse.
    blip = Blip(int(r.connection_pool.connection_kwargs["port"]))
    db = r.connection_pool.connection_kwargs["db"]
    client = redis_conn.async_client(Settings(), f"redis://127.0.0.1:{blip.port}/{db}")
    publisher = ConfirmedPublisher(broker.AsyncQueue(client, message_events=500), r)
    commit = GroupCommit(publisher.publish, flush_ms=5, message_events=500)

    def submit_all(prefix: str) -> Any:
        requests = (commit.submit([event_item(f"{prefix}{i}")]) for i in range(20))
        return asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 30)

    try:
        await commit.submit([event_item("before")])  # connected, and working
        blip.refuse()
        refused = await submit_all("refused-")
        blip.admit()
        taken = await submit_all("after-")
    finally:
        await commit.close()
        await client.aclose()
        blip.close()
    # Every request of the refused groups was told (its client resends), none hangs ...
    assert all(isinstance(answer, broker.QUEUE_ERRORS) for answer in refused), refused
    # ... and the next requests are queued as if nothing happened.
    assert taken == [None] * 20
    queued = sorted(i["id"] for i in queued_items(r))
    assert queued == sorted(["before", *(f"after-{i}" for i in range(20))])


# --- dead-letter replay -----------------------------------------------------------------


class LosesAScriptCall(redis.Redis):
    """A client whose next script call is lost: its request before Redis runs it
    (`lost = "request"`), or its reply after (`lost = "reply"`), as a cut connection would."""

    lost: str | None = None

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] not in ("EVAL", "EVALSHA"):
            return super().execute_command(*args, **options)
        if self.lost == "request":
            self.lost = None
            raise redis.ConnectionError("the request was lost")
        result = super().execute_command(*args, **options)
        if self.lost == "reply":
            self.lost = None
            raise redis.ConnectionError("the reply was lost")
        return result


def dead_letters(r: redis.Redis, n: int, prefix: str = "d") -> list[str]:
    entries = [deadletter.new_entry(event_item(f"{prefix}{i}"), Reason.REJECTED) for i in range(n)]
    deadletter.add(r, entries)
    return [e.id for e in entries]


def test_replay_requeues_once_and_a_failed_publish_keeps_the_entries(r: redis.Redis) -> None:
    ids = dead_letters(r, 3)
    client = LosesAScriptCall.from_url(url_of(r))
    queue = broker.Queue(client, 500)
    client.lost = "request"
    with pytest.raises(redis.ConnectionError):
        deadletter.replay(client, ids, queue)
    assert r.hlen(keys.DLQ_ENTRIES) == 3  # nothing lost, and replayable again
    assert deadletter.replay(client, ids, queue) == 3
    assert deadletter.replay(client, ids, queue) == 0
    published = queued_items(r, keys.REPLAY_QUEUE)
    assert sorted(i["id"] for i in published) == ["d0", "d1", "d2"]
    assert all(i["attempts"] == 0 and i["replayed_from"] in ids for i in published)
    assert r.hlen(keys.DLQ_ENTRIES) == 0


def test_a_replay_whose_reply_was_lost_is_not_queued_again(r: redis.Redis) -> None:
    ids = dead_letters(r, 3)
    client = LosesAScriptCall.from_url(url_of(r))
    queue = broker.Queue(client, 500)
    client.lost = "reply"
    with pytest.raises(redis.ConnectionError):
        deadletter.replay(client, ids, queue)
    # The operator saw an error (the admin API answers 503) and replays again.
    assert deadletter.replay(client, ids, queue) == 0
    assert sorted(i["id"] for i in queued_items(r, keys.REPLAY_QUEUE)) == ["d0", "d1", "d2"]
    assert int(r.get(keys.DEPTH_READY)) == 3 and r.hlen(keys.DLQ_ENTRIES) == 0
    assert int(r.hget(keys.STATS, "replayed")) == 3


def test_a_replay_of_entries_purged_meanwhile_queues_the_rest(r: redis.Redis) -> None:
    ids = dead_letters(r, 3)

    class PurgeFirst(broker.Queue):
        def messages(self, items: Any, per_message: int | None = None) -> Any:
            deadletter.purge(r, [ids[0]])  # while the first try encodes its messages
            return super().messages(items, per_message)

    assert deadletter.replay(r, ids, PurgeFirst(r, 500)) == 2
    assert sorted(i["id"] for i in queued_items(r, keys.REPLAY_QUEUE)) == ["d1", "d2"]


def test_a_large_replay_pages_through_a_snapshot_beside_another_replay(r: redis.Redis) -> None:
    # 1,200 dead letters: three pages of 500. Two replays at once (an operator's CLI and
    # the admin page): while the first is publishing its first page, the second runs
    # from start to end.
    dead_letters(r, 1200)
    first_publishing, second_done = threading.Event(), threading.Event()

    class Held(broker.Queue):
        def messages(self, items: Any, per_message: int | None = None) -> Any:
            if not first_publishing.is_set():
                first_publishing.set()
                assert second_done.wait(30)
            return super().messages(items, per_message)

    def replay_all(queue: broker.Queue) -> int:
        return sum(deadletter.replay(r, page, queue) for page in deadletter.Selection().pages(r))

    first: list[int] = []
    runner = threading.Thread(target=lambda: first.append(replay_all(Held(r, 500))))
    runner.start()
    try:
        assert first_publishing.wait(30)
        second = replay_all(broker.Queue(r, 500))
        # Dead letters of events failing now: after both snapshots, left for a later replay.
        dead_letters(r, 5, "late")
    finally:
        second_done.set()
        runner.join(30)
    # Each entry published once: none skipped as entries vanished under the pages, none
    # taken by both replays.
    published = [i["id"] for i in queued_items(r, keys.REPLAY_QUEUE)]
    assert sorted(published) == sorted(f"d{i}" for i in range(1200))
    assert first[0] + second == 1200 and first[0] > 0 and second > 0
    assert sorted(e.item["id"] for e in deadletter.list_entries(r)) == [
        f"late{i}" for i in range(5)
    ]
    assert int(r.hget(keys.STATS, "replayed")) == 1200
