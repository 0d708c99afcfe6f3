"""Messages an earlier relay left queued are delivered by today's worker.

tests/fixtures/wire holds Celery messages exactly as the relay at f1bd916 wrote them to
Redis (ingest's two publishers, the delayed-set mover, `relay dlq replay`; see
tests/fixtures/wire/capture.py). They go into the queues byte for byte, as if the
relay had been upgraded with them waiting, and a real `relay worker` takes them.
"""

from __future__ import annotations

import pytest
import redis

from relay import keys
from relay.resolution import Known
from relay.state import identity
from tests.conftest import ROOT
from tests.integration.conftest import Sandbox, Starter, settled, wait_for

pytestmark = pytest.mark.integration

OLD = ROOT / "tests" / "fixtures" / "wire"


def tracks(user: str, *names: str) -> list[tuple[str, str, str]]:
    return [("trackEvent", name, user) for name in names]


# Each file's queue, and what its events make ChurnZero receive (action, name, contact).
FILES = {
    "ingest-pipelined": (keys.QUEUE, [
        ("setAttribute", "FirstName", "ann"), ("setAttribute", "plan", "ann"),
        ("setAttribute", "seats", "ann"), *tracks("ann", "ingest-1", "ingest-2"),
    ]),
    "ingest-webhook": (keys.QUEUE, tracks("bob", "webhook-1")),
    "ingest-celery": (keys.QUEUE, tracks("fay", "celery-1", "celery-2")),
    "mover-retry": (keys.QUEUE, tracks("cid", "retry-1", "retry-2")),
    # A track that waited for its user's identify, which has come since.
    "mover-identity-wait": (keys.QUEUE, tracks("dee", "identity-wait-1")),
    "replay": (keys.REPLAY_QUEUE, tracks("eve", "replay-1", "replay-2")),
    "mover-replayed-retry": (keys.REPLAY_QUEUE, tracks("eve", "replay-1", "replay-2")),
}  # fmt: skip
# The replayed events' retry carries the replay's own relay ids: a test of its own.
GROUPS = {
    "ingest-mover-replay": [name for name in FILES if name != "mover-replayed-retry"],
    "replayed-then-retried": ["mover-replayed-retry"],
}


def received(sandbox: Sandbox) -> list[tuple[str, str, str]]:
    return sorted(
        (c["action"], c.get("eventName") or c["name"], c["contactExternalId"].split("@")[0])
        for c in sandbox.commands()
    )


@pytest.mark.parametrize("group", GROUPS.values(), ids=GROUPS.keys())
def test_messages_an_earlier_relay_queued_are_delivered(
    group: list[str], r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    identity.seed(r, {"u:dee": Known("acct-dee", "dee@example.com")}, ttl_s=3600)
    for name in group:
        queue, _ = FILES[name]
        for raw in (OLD / f"{name}.jsonl").read_bytes().splitlines():
            r.lpush(queue, raw)  # as kombu does: the oldest is popped first
    expected = sorted(c for name in group for c in FILES[name][1])
    start_worker()
    wait_for(lambda: len(clean_sandbox.commands()) >= len(expected) and settled(r), timeout=30)
    assert received(clean_sandbox) == expected
    assert r.hlen(keys.DLQ_ENTRIES) == 0
    replayed = sum(len(FILES[name][1]) for name in group if FILES[name][0] == keys.REPLAY_QUEUE)
    assert int(r.hget(keys.STATS, "replay_delivered") or 0) == replayed
