"""Search and replay of the archive: real Parquet files, a real Redis (the records not yet
archived, a replay's progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
import redis

from relay.archive import replay, schema, search
from relay.archive.store import Store, open_store
from relay.settings import Settings
from relay.state import archive as staged
from relay.state import broker
from tests.integration.conftest import queued_items

NOW = 1_796_690_000.0  # 2026-12-08T...Z


def record(i: int, at: float, **more: Any) -> dict[str, Any]:
    user = more.pop("user_id", f"u{i % 3}")
    event = {"type": "track", "event": "Login", "userId": user, "messageId": f"m{i}",
             "properties": {"n": i}}  # fmt: skip
    return {
        "settled_at": at, "received_at": at - 1, "relay_id": f"r{i:04d}", "outcome": "delivered",
        "type": "track", "message_id": f"m{i}", "user_id": user, "account_id": f"acct{i % 2}",
        "event": "Login", "source": "api", "lane": "live", "attempts": 0,
        "commands": orjson.dumps([{"action": "trackEvent", "n": i}]).decode(),
        "tries": orjson.dumps([{"at": at, "status": 200, "error": None}]).decode(),
        "body": orjson.dumps(event).decode(), **more,
    }  # fmt: skip


def stage(r: redis.Redis, rows: list[dict[str, Any]]) -> None:
    pipe = r.pipeline(transaction=True)
    staged.stage_records(pipe, rows)
    pipe.execute()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(Settings(archive_dir=tmp_path / "archive"))


def test_lookups_filters_and_newest_first(r: redis.Redis, store: Store) -> None:
    rows = [record(i, NOW - 3600 * i) for i in range(60)]  # 2.5 days, hourly
    rows[7] |= {"outcome": "skipped", "reason": "unknown_event", "commands": None}
    store.write(schema.to_table(rows[10:]), "w1")
    stage(r, rows[:10])  # the newest, not yet archived

    def find(limit: int = 100, **filters: Any) -> list[dict[str, Any]]:
        return search.search(store, r, search.Query.of(filters, NOW), limit)

    newest = find()
    assert [h["relay_id"] for h in newest] == [f"r{i:04d}" for i in range(60)]
    (hit,) = find(message_id="m3")  # not archived yet: found in Redis
    assert hit["body"]["properties"] == {"n": 3} and hit["commands"] == [
        {"action": "trackEvent", "n": 3}
    ]
    assert hit["tries"][0]["status"] == 200 and hit["settled_at"] == pytest.approx(NOW - 3 * 3600)
    assert find(message_id="m42")[0]["relay_id"] == "r0042"  # archived
    assert find(message_id="nope") == []
    assert {h["user_id"] for h in find(user_id="u1")} == {"u1"} and len(find(user_id="u1")) == 20
    assert [h["relay_id"] for h in find(outcome="skipped")] == ["r0007"]
    assert find(reason="unknown_event")[0]["reason"] == "unknown_event"
    assert len(find(account_id="acct1", user_id="u1")) == 10
    assert len(find(since="5h")) == 6  # r0..r5
    assert [h["relay_id"] for h in find(since="30h", until="28h")] == ["r0028", "r0029", "r0030"]
    assert len(find(limit=5)) == 5
    assert find(event="Logout") == []


def test_a_record_archived_twice_is_answered_once(r: redis.Redis, store: Store) -> None:
    rows = [record(i, NOW - i) for i in range(5)]
    store.write(schema.to_table(rows), "w1")
    store.write(schema.to_table(rows[:2]), "w2")  # an archiver killed before it trimmed
    stage(r, rows[:1])
    assert len(search.search(store, r, search.Query(), 100)) == 5


def test_forgotten_users_are_hidden(r: redis.Redis, store: Store) -> None:
    rows = [record(i, NOW - 100 + i, user_id="ann" if i % 2 else "bob") for i in range(10)]
    store.write(schema.to_table(rows[:5]), "w1")
    stage(r, rows[5:])
    forgotten = {"user_key": [schema.key_of("ann")], "user_id": ["ann"],
                 "forgotten_at": [int((NOW - 100 + 7.5) * 1000)]}  # fmt: skip
    store.forget(pa.Table.from_pydict(forgotten, schema=schema.FORGOTTEN), "w1")
    # ann's events received before she was forgotten are gone; the one after stays.
    ann = search.search(store, r, search.Query(user_id="ann"), 100)
    assert [h["relay_id"] for h in ann] == ["r0009"]
    assert len(search.search(store, r, search.Query(user_id="bob"), 100)) == 5


def test_no_files_and_no_redis_is_an_empty_answer(store: Store) -> None:
    assert search.search(store, None, search.Query(user_id="x"), 10) == []


def test_a_replay_queues_the_slice_once_and_continues(r: redis.Redis, store: Store) -> None:
    rows = [record(i, NOW - 60 * i) for i in range(100)]
    rows[1] = record(1, NOW - 60, body=None)  # nothing to send
    store.write(schema.to_table(rows[20:]), "w1")
    stage(r, rows[:20])
    queue = broker.Queue(r, 1000)
    filters = {"since": str(NOW - 60 * 49.5), "until": str(NOW), "user_id": "u0"}
    job = replay.Replay.of(r, filters, NOW)
    steps = job.run(r, store, queue, 10, now=NOW, page_size=4)
    with pytest.raises(StopIteration):
        while True:
            step = next(steps)
            if step.done >= 4:
                steps.close()  # Ctrl-C after a page
                raise StopIteration
    first = job.done
    again = replay.Replay.of(r, filters, NOW + 999)  # the same command, later: continues
    assert again.id == job.id and again.done == first and again.cursor == job.cursor
    for _ in again.run(r, store, queue, 10, now=NOW):
        pass
    items = queued_items(r, "relay.replay")
    expected = {f"r{i:04d}" for i in range(50) if i % 3 == 0 and i != 1}
    assert sorted(i["id"] for i in items) == sorted(expected)  # each once
    assert all(i["replayed_from"] == f"archive:{job.id}" for i in items)
    assert items[0]["event"]["type"] == "track"
    assert again.done == len(expected) and again.skipped == 0
    assert int(r.get("relay:depth:ready") or 0) == len(expected)
    for _ in replay.Replay.of(r, filters, NOW).run(r, store, queue, 10):
        pass  # done already: queues nothing
    assert len(queued_items(r, "relay.replay")) == len(expected)


def test_a_replay_needs_a_time_range(r: redis.Redis) -> None:
    with pytest.raises(search.QueryError, match="--since and --until"):
        replay.Replay.of(r, {"since": "2h"})


def test_two_runs_of_one_replay_cannot_both_queue(r: redis.Redis, store: Store) -> None:
    store.write(schema.to_table([record(i, NOW - i) for i in range(30)]), "w1")
    filters = {"since": str(NOW - 100), "until": str(NOW)}
    one, two = replay.Replay.of(r, filters), replay.Replay.of(r, filters)
    queue = broker.Queue(r, 1000)
    next(one.run(r, store, queue, 10, page_size=10))
    with pytest.raises(replay.ReplayBusy):
        next(two.run(r, store, queue, 10, page_size=10))
    for _ in one.run(r, store, queue, 10):
        pass
    assert len({i["id"] for i in queued_items(r, "relay.replay")}) == 30


def test_the_archiver_makes_its_group_again_when_redis_lost_the_stream(
    r: redis.Redis, tmp_path: Path
) -> None:
    import threading

    from relay import keys
    from relay.archive.archiver import Archiver
    from tests.integration.conftest import wait_for

    settings = Settings(archive_dir=tmp_path / "archive", archive_flush_s=0.5)
    store = open_store(settings)
    archiver = Archiver(settings, r, store, name="t")
    thread = threading.Thread(target=archiver.run, daemon=True)
    thread.start()
    try:
        stage(r, [record(0, NOW)])
        wait_for(lambda: len(search.search(store, None, search.Query(), 10)) == 1)
        r.delete(keys.ARCHIVE)  # the stream and its consumer group with it
        stage(r, [record(1, NOW + 1)])
        wait_for(lambda: len(search.search(store, None, search.Query(), 10)) == 2, 30)
        assert r.xlen(keys.ARCHIVE) == 0
    finally:
        archiver.stop()
        thread.join(30)
