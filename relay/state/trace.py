"""Where is this event? `relay trace MESSAGE_ID` looks in every place an event can be.

    queued      a message in a Celery queue (peeked, read-only)
    in flight   a message a worker holds (kombu's `unacked` hash)
    delayed     the delayed set: next attempt, cause, attempts so far
    dead        the dead-letter queue: reason
    delivered   the record of recent settlements: when, and the commands sent
    skipped     the same record: when, and why

Workers write the record (`relay:trace`, a Redis stream of about `trace_size` events)
in their settlement MULTI: one entry per settlement, holding each event it delivered,
skipped or dead-lettered.
Lookups scan (queue, unacked, delayed set, the record, the newest dead letters): an
operator's tool, O(what is there), never on the delivery path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import keys, wire
from relay.commands import Command
from relay.envelope import Envelope, decode_all
from relay.state import deadletter

PAGE = 500
RECORD_PAGE = 50  # record entries per read: each holds a settlement's events
DLQ_SCAN = 10_000  # newest dead letters searched when the record has no sign of the event


@dataclass
class Sighting:
    """One place the event was found, with what that place knows about it."""

    state: str  # queued, in_flight, delayed, dead, delivered, skipped
    at: float | None = None  # when it got there (settled, dead-lettered) or is due (delayed)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The sighting as JSON-ready data."""
        return {"state": self.state, "at": self.at, **self.detail}


# One stream entry per settlement: `n` events, `v` their outcomes as one JSON array of
# [outcome, messageId, relay id, commands or why, dead-letter entry or null, user, event]:
# one command in the MULTI and one encode, however many events the batch settled. The
# user (userId, else anonymousId) and event (a track's name, else the type) let `relay
# tail` filter; entries written before them end at the dead-letter entry (or before it).
# The cap counts events: each entry trims the stream to the entries that hold about
# `size` events like it.
# Exact trimming: with few entries of many events, whole nodes would overshoot the cap.
DELIVERED, SKIPPED, DEAD = "d", "s", "x"
STATES = {DELIVERED: "delivered", SKIPPED: "skipped", DEAD: "dead"}


def stage_record(
    pipe: Any,
    size: int,
    *,
    delivered: Iterable[tuple[Envelope, list[Command]]] = (),
    skipped: Iterable[tuple[Envelope, str]] = (),
    dead: Iterable[deadletter.DeadLetter] = (),
) -> None:
    """Queue on the settlement's pipeline: one record entry holding the events settled."""
    if size <= 0:
        return
    events: list[list[Any]] = []
    for item, commands in delivered:
        message_id, user, name = _about_event(item.event)
        events.append(
            [DELIVERED, message_id, item.id, [c.to_dict() for c in commands], None, user, name]
        )
    for item, reason in skipped:
        message_id, user, name = _about_event(item.event)
        events.append([SKIPPED, message_id, item.id, reason, None, user, name])
    for entry in dead:
        # An entry's item as stored: not always an envelope (a message the relay did not write).
        rid = str(entry.item.get("id", ""))
        message_id, user, name = _about_event(entry.item.get("event"))
        events.append([DEAD, message_id, rid, entry.reason.value, entry.id, user, name])
    if not events:
        return
    events = events[-size:]  # a settlement larger than the record keeps its newest
    entries = -(-size // len(events))
    pipe.xadd(
        keys.TRACE, {"n": len(events), "v": orjson.dumps(events)}, maxlen=entries, approximate=False
    )


def _about_event(event: Any) -> tuple[Any, Any, Any]:
    """The event's messageId, user (userId, else anonymousId) and name (a track's, else the
    type), as the event holds them: any JSON, "" when absent; readers take them as text."""
    if not isinstance(event, dict):
        return "", "", ""
    get = event.get
    return (
        get("messageId") or "",
        get("userId") or get("anonymousId") or "",
        (get("event") or get("type") or ""),
    )


def find(
    r: Any, wanted: str, queues: Iterable[str] = (keys.QUEUE, keys.REPLAY_QUEUE),
    *, archived: Callable[[str], list[Sighting]] | None = None,
) -> list[Sighting]:  # fmt: skip
    """Every place the event with this messageId (or relay id) is, most current first.
    `archived` (relay.archive.search.sightings, which this side may not import) answers
    for an event settled before the oldest the record holds."""
    needle = wanted.encode()
    found: list[Sighting] = []
    for queue in queues:
        for start in range(0, int(r.llen(queue)), PAGE):
            for raw in r.lrange(queue, start, start + PAGE - 1):
                for item in _message_items(raw, needle):
                    if _matches(item, wanted):
                        found.append(Sighting("queued", None, _about(item, queue=queue)))
    for raw in r.hvals(keys.CELERY_UNACKED):
        for item in _message_items(raw, needle, unacked=True):
            if _matches(item, wanted):
                found.append(Sighting("in_flight", None, _about(item)))
    for member, due in r.zscan_iter(keys.DELAYED, count=PAGE):
        batch_text = wire.unpack_text(member)
        if needle not in batch_text:
            continue
        batch = orjson.loads(batch_text)
        for item in _decoded(batch["items"]):
            if _matches(item, wanted):
                about = _about(item, cause=batch.get("cause"))
                found.append(Sighting("delayed", float(due), about))
    settled = list(_recorded(r, wanted))
    found += settled
    if not any(s.state == "dead" for s in settled):
        found += _dead(r, wanted, needle)
    if archived is not None and not any(s.state in STATES.values() for s in found):
        found += archived(wanted)
    return found


def _recorded(r: Any, wanted: str) -> Iterator[Sighting]:
    needle, last = orjson.dumps(wanted)[1:-1], "+"  # as the id reads inside the JSON
    while True:
        page = r.xrevrange(keys.TRACE, max=last, min="-", count=RECORD_PAGE)
        for stream_id, raw in page:
            value = raw.get(b"v", b"")
            if needle not in value:
                continue
            at = int(stream_id.decode().split("-")[0]) / 1000
            for event in reversed(orjson.loads(value)):
                if wanted in (event[1], event[2]):
                    yield _settled(r, at, event)
        if len(page) < RECORD_PAGE:
            return
        last = "(" + page[-1][0].decode()


def _settled(r: Any, at: float, event: list[Any]) -> Sighting:
    state, message_id, relay_id, what = event[:4]
    detail: dict[str, Any] = {"relay_id": relay_id, "message_id": message_id}
    if state == DELIVERED:
        detail["commands"] = what
    else:
        detail["reason"] = what
    if len(event) > 5:
        detail["user"], detail["event"] = event[5], event[6]
    if state == DEAD:
        detail["entry"] = event[4]
        detail["still_dead"] = deadletter.get(r, event[4]) is not None  # replayed or purged?
    return Sighting(STATES[state], at, detail)


def _dead(r: Any, wanted: str, needle: bytes) -> list[Sighting]:
    # Dead letters written at ingest (invalid events) never went through a worker.
    out = []
    for start in range(0, DLQ_SCAN, PAGE):
        ids = r.zrevrange(keys.DLQ_INDEX, start, start + PAGE - 1)
        if not ids:
            break
        for entry_id, raw in zip(ids, r.hmget(keys.DLQ_ENTRIES, ids), strict=True):
            if raw is None or needle not in raw:
                continue
            entry = orjson.loads(raw)
            for item in _decoded([entry["item"]]):
                if _matches(item, wanted):
                    about = _about(item, reason=entry["reason"], entry=entry_id.decode())
                    out.append(Sighting("dead", entry["last_failure"], about))
    return out


def _message_items(raw: bytes, needle: bytes, *, unacked: bool = False) -> list[Envelope]:
    """The envelopes of a Celery message, if it mentions `needle`."""
    if needle not in raw and b"base64" not in raw:
        return []
    try:
        frame = orjson.loads(raw)
        if unacked:  # kombu keeps [message, exchange, routing key]
            frame = frame[0]
        items = wire.items_of(frame)
    except (ValueError, KeyError, IndexError, TypeError):
        return []
    return _decoded(items) if isinstance(items, list) else []


def _decoded(items: list[Any]) -> list[Envelope]:
    # What does not decode is no relay event to find (a message another producer wrote).
    return decode_all(items)[0]


def _matches(item: Envelope, wanted: str) -> bool:
    return wanted in (item.id, item.message_id)


def _about(item: Envelope, **extra: Any) -> dict[str, Any]:
    about = {
        "relay_id": item.id,
        "message_id": item.event.get("messageId"),
        "type": item.event.get("type"),
        "attempts": item.attempts,
    }
    return about | {k: v for k, v in extra.items() if v is not None}
