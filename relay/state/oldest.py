"""The age of the oldest undelivered event in each state it can wait in, read from Redis
without reading every event: a look at the ends of what holds them.

    ready          the messages next in line in each queue
    in_flight      the message handed to a worker longest ago (kombu's unacked index)
    delayed        the delayed set's retries, by the index of their members' oldest
    identity_wait  receipts (relay.delivery.delayed), one index per state

A message moved back from the delayed set joins the queue's far end: behind a long
queue, its events count as ready only once they are next in line.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay import keys, wire

STATES = ("ready", "in_flight", "delayed", "identity_wait")
READS = 6  # replies `stage_read` adds to the pipeline


def _oldest_received(items: Any) -> float | None:
    # The earliest receipt time among a message's items (None: none to read).
    times = [
        i["received_at"] for i in items
        if isinstance(i, dict) and isinstance(i.get("received_at"), int | float)
    ]  # fmt: skip
    return min(times) if times else None


def _queued_received(message: bytes | None) -> float | None:
    # Read-only peek at a queued message (unacked: kombu's [message, exchange, routing key]).
    if not message:
        return None
    try:
        frame = orjson.loads(message)
        if isinstance(frame, list):
            frame = frame[0]
        return _oldest_received(wire.items_of(frame))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# KEYS: kombu's unacked index and hash. The message handed to a worker longest ago.
_LONGEST_UNACKED = """
local tag = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not tag then return false end
return redis.call('HGET', KEYS[2], tag)
"""


def stage_read(pipe: Any) -> None:
    """Queue on a pipeline the `READS` reads `ages` needs."""
    pipe.lindex(keys.QUEUE, -1)
    pipe.lindex(keys.REPLAY_QUEUE, -1)
    pipe.eval(_LONGEST_UNACKED, 2, keys.CELERY_UNACKED_INDEX, keys.CELERY_UNACKED)
    pipe.zcard(keys.DELAYED)
    for state in ("delayed", "identity_wait"):
        pipe.zrange(keys.delayed_received(state), 0, 0, withscores=True)


def ages(found: list[Any], now: float) -> dict[str, float]:
    """The oldest age (s) by state from what `stage_read` read.

    Ready: the messages next in line in each queue; in flight: the message handed to a
    worker longest ago; delayed and identity_wait: the oldest receipt in their index
    (relay.delivery.delayed), believed only while the delayed set holds members."""
    live, replay, unacked, delayed_members, *indexed = found
    received: dict[str, float | None] = {
        "ready": min(
            (t for t in map(_queued_received, (live, replay)) if t is not None), default=None
        ),
        "in_flight": _queued_received(unacked),
    }
    for state, oldest in zip(("delayed", "identity_wait"), indexed, strict=True):
        received[state] = float(oldest[0][1]) if oldest and delayed_members else None
    by_state = {}
    for state in STATES:
        at = received.get(state)
        by_state[state] = round(max(now - at, 0.0), 3) if at is not None else 0.0
    return by_state
