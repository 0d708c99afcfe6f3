"""Messages a worker cannot run: dead-lettered with a reason, never dropped or circling.

Another Celery app publishing to the relay's queue, an older or newer relay, a damaged
message: the worker acks each one only once it is in the dead-letter queue, and the work
behind it goes on.
"""

from __future__ import annotations

import base64
import json

import pytest
import redis

from relay import wire
from tests.integration.conftest import Sandbox, Starter, event_item, wait_for

pytestmark = pytest.mark.integration


def _message(rid: str, **headers: object) -> dict[str, object]:
    message: dict[str, object] = json.loads(wire.MessageWriter().encode([event_item(rid)]))
    message["headers"] = {**message["headers"], **headers}  # type: ignore[dict-item]
    return message


def _reasons(r: redis.Redis) -> list[str]:
    return sorted(json.loads(raw)["reason"] for raw in r.hvals("relay:dlq:entries"))


def _nothing_held(r: redis.Redis) -> bool:
    return r.llen("relay") == 0 and r.hlen("unacked") == 0


def test_unknown_task_and_undecodable_body_are_dead_lettered_and_work_goes_on(
    r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    unknown = _message("u-1", task="other_app.task")
    damaged = _message("d-1")
    damaged["body"] = base64.b64encode(b"not a zlib stream").decode()
    # Oldest first: the worker pops from the right.
    for message in (unknown, damaged, _message("ok-1")):
        r.lpush("relay", json.dumps(message))
    start_worker()
    clean_sandbox.wait_commands(1)
    wait_for(lambda: len(_reasons(r)) == 2 and _nothing_held(r), timeout=30)
    assert _reasons(r) == ["undecodable_message", "unknown_task"]
    assert [c["eventName"] for c in clean_sandbox.commands()] == ["ok-1"]
    stats = r.hgetall("relay:stats")
    assert int(stats[b"dead_letters:unknown_task"]) == 1
    assert int(stats[b"dead_letters:undecodable_message"]) == 1


def test_a_queue_entry_that_is_not_a_message_is_dead_lettered(
    r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    r.lpush("relay", b"{not json")
    r.lpush("relay", json.dumps(_message("ok-2")))
    worker = start_worker()
    clean_sandbox.wait_commands(1)
    wait_for(lambda: _reasons(r) == ["undecodable_message"] and _nothing_held(r), timeout=30)
    assert [c["eventName"] for c in clean_sandbox.commands()] == ["ok-2"]
    worker.check_alive()
