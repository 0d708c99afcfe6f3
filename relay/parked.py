"""Parked traits, the pure part: what an identify parks, and the identify events that
send the parked traits once the user is known (relay.state.parking keeps them in Redis).

An identify whose user the relay cannot place yet (no account) parks the traits it
would send, newest value per trait by event time. When the user becomes known, the
parked traits come back as identify calls of that user, one per event time (so the
attribute clock weighs each value by its own time), through the worker like any other.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson

from relay import clock, events
from relay.envelope import Envelope
from relay.resolution import ID_KEYS
from relay.translate import attribute_value

Parked = dict[str, tuple[int, Any]]  # trait -> (event time in ms, value)
SOURCE = "parked"  # the envelope source of a release (`integrations.All` is not applied)


def parkable(event: events.Identify) -> dict[str, Any]:
    """The traits of an identify worth parking: those that could become attributes."""
    return {
        trait: value
        for trait, value in event.traits.items()
        if trait not in ID_KEYS
        and trait.strip()
        and (attribute_value(value) is not None or trait == "company")
    }


def event_ms(event: events.AnyEvent, received_at: float | None) -> int:
    """The event's time in epoch ms (its receipt when it has none)."""
    if event.timestamp is not None:
        return int(event.timestamp.timestamp() * 1000)
    return int((received_at or 0.0) * 1000)


def release_items(user: str, parked: Parked, now: float) -> list[Envelope]:
    """The identify calls that send a user's parked traits (`user`: `u:<userId>` or
    `a:<anonymousId>`), one per event time; their ids are stable, so a batch planned twice
    releases the same items."""
    by_time: dict[int, dict[str, Any]] = {}
    for trait, (ms, value) in sorted(parked.items()):
        by_time.setdefault(ms, {})[trait] = value
    field = "userId" if user.startswith("u:") else "anonymousId"
    out = []
    for ms, traits in sorted(by_time.items()):
        stamp = clock.iso(datetime.fromtimestamp(ms / 1000, UTC))
        content = orjson.dumps([user, ms, traits], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha1(content).hexdigest()[:24]
        event = {"type": "identify", field: user[2:], "traits": traits, "timestamp": stamp,
                 "messageId": f"parked-{digest}"}  # fmt: skip
        out.append(Envelope.new(event, source=SOURCE, received_at=now, rid=f"parked-{digest}"))
    return out
