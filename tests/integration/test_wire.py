"""The relay's own publisher (relay.state.broker, relay.wire): what it writes is a Celery message
the unchanged `relay worker` consumes, with the items' JSON as Celery's `send_task` writes
it, and the counts that go with it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from relay import keys, wire
from relay.settings import Settings
from relay.state import broker
from tests.integration.conftest import (
    APP_KEY,
    Sandbox,
    Starter,
    queued_items,
    settled,
    url_of,
    wait_for,
)
from tests.procs import free_port

pytestmark = pytest.mark.integration


def item(rid: str, contact: str = "C") -> dict[str, Any]:
    ids = {"accountExternalId": "A", "contactExternalId": contact}
    event = {"type": "track", "userId": "u", "event": rid, "messageId": f"m-{rid}",
             "timestamp": "2026-11-29T10:00:00Z", "properties": ids}  # fmt: skip
    return {"id": rid, "source": "webhook", "received_at": time.time(), "attempts": 0,
            "event": event}  # fmt: skip


def messages(r: redis.Redis) -> list[dict[str, Any]]:
    """The kombu frames in the `relay` list, oldest first."""
    return [json.loads(raw) for raw in reversed(r.lrange(keys.QUEUE, 0, -1))]


def publish(url: str, groups: list[list[dict[str, Any]]], message_events: int, **kw: Any) -> None:
    """Publish each group through one AsyncQueue, as one ingest process does."""

    async def run() -> None:
        client = aioredis.from_url(url, socket_connect_timeout=1)
        queue = broker.AsyncQueue(client, message_events)
        try:
            for group in groups:
                await queue.publish(group, **kw)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_pipelined_messages_reach_churnzero_through_the_real_worker(
    r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    publish(url_of(r), [[item(f"e{i}") for i in range(7)], [item("e7")]], 3)
    assert r.llen(keys.QUEUE) == 4  # 3 + 3 + 1, then 1: one message per group of 3
    assert int(r.get(keys.DEPTH_READY) or 0) == 8  # counted in the same script call
    assert sum(int(r.get(k) or 0) for k in r.keys("relay:rate:ingested:*")) == 8
    start_worker()
    wait_for(lambda: len(clean_sandbox.commands()) == 8 and settled(r))
    commands = clean_sandbox.commands()
    assert sorted(c["eventName"] for c in commands) == [f"e{i}" for i in range(8)]
    assert all(c["appKey"] == APP_KEY and c["action"] == "trackEvent" for c in commands)
    # The worker claimed each message by its task id and settled it.
    assert int(r.hget("relay:stats", "delivered") or 0) == 8
    assert int(r.get(keys.DEPTH_READY) or 0) == 0


def test_a_pipelined_message_is_shaped_like_celerys_own(r: redis.Redis) -> None:
    items = [item("a"), item("b")]
    broker.send(broker.make_celery(Settings(), url_of(r)), items)
    publish(url_of(r), [items], 500)
    celerys, ours = messages(r)
    assert ours.keys() == celerys.keys()
    assert ours["headers"].keys() == celerys["headers"].keys()
    assert ours["properties"].keys() == celerys["properties"].keys()
    for field in ("content-type", "content-encoding"):
        assert ours[field] == celerys[field]
    for field in ("task", "lang", "retries", "timelimit", "kwargsrepr", "compression"):
        assert ours["headers"][field] == celerys["headers"][field]
    for field in ("delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert ours["properties"][field] == celerys["properties"][field]
    # Both zlib-compressed, as Celery's compression="zlib" does, to the same body byte
    # for byte once inflated: the items' wire JSON is unchanged.
    assert ours["headers"]["compression"] == wire.COMPRESSION
    assert wire.body_of(ours) == wire.body_of(celerys)
    assert zlib.decompress(base64.b64decode(ours["body"])) == wire.body_of(ours)
    assert queued_items(r) == items + items


def test_a_replay_is_queued_in_its_lane_as_celery_routes_it_and_counted(r: redis.Redis) -> None:
    items = [{**item(f"p{i}"), "replayed_from": f"dead-{i}"} for i in range(3)]
    broker.send(broker.make_celery(Settings(), url_of(r)), items)
    broker.Queue(r, message_events=500).publish(items, per_message=2)
    celerys, *ours = [json.loads(raw) for raw in reversed(r.lrange(keys.REPLAY_QUEUE, 0, -1))]
    assert r.llen(keys.QUEUE) == 0 and len(ours) == 2  # 2 + 1 events
    for message in ours:
        assert message["properties"]["delivery_info"] == celerys["properties"]["delivery_info"]
    assert queued_items(r, keys.REPLAY_QUEUE) == items + items
    assert int(r.get(keys.DEPTH_READY) or 0) == 3  # Celery's own send counts nothing


def test_every_message_has_its_own_task_id_and_delivery_tag(r: redis.Redis) -> None:
    publish(url_of(r), [[item(f"x{i}") for i in range(25)], [item("y")]], 1)
    publish(url_of(r), [[item(f"z{i}") for i in range(25)]], 1)  # another ingest process
    frames = messages(r)
    task_ids = {m["headers"]["id"] for m in frames}
    tags = {m["properties"]["delivery_tag"] for m in frames}
    assert len(task_ids) == len(tags) == 51
    assert all(m["headers"]["root_id"] == m["headers"]["id"] for m in frames)


def test_a_message_id_makes_the_same_messages_which_run_once(
    r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    batch = [item("r0", "C0"), item("r1", "C1"), item("r2", "C2")]
    # The same batch twice under one message id, as the mover may publish a retry.
    publish(url_of(r), [batch, batch], 2, message_id="retry-1")
    assert [m["headers"]["id"] for m in messages(r)] == ["retry-1.0", "retry-1.1"] * 2
    start_worker()
    wait_for(lambda: r.llen(keys.QUEUE) == 0 and settled(r))
    assert sorted(c["eventName"] for c in clean_sandbox.commands()) == ["r0", "r1", "r2"]


def test_publishing_to_an_absent_redis_raises_a_queue_error() -> None:
    with pytest.raises(broker.QUEUE_ERRORS):
        publish(f"redis://127.0.0.1:{free_port()}/0", [[item("lost")]], 10)
