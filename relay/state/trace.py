"""Where is this event? `relay trace MESSAGE_ID` looks in every place an event can be.

    queued      a message in a Celery queue (peeked, read-only)
    in flight   a message a worker holds (kombu's `unacked` hash)
    delayed     the delayed set: next attempt, cause, attempts so far
    dead        the dead-letter queue: reason
    delivered   the record of recent settlements: when, and the commands sent
    skipped     the same record: when, and why

Workers write the record (`relay:trace`, a Redis stream capped at `trace_size` entries)
in their settlement MULTI: one entry per event delivered, skipped or dead-lettered.
Lookups scan (queue, unacked, delayed set, the record, the newest dead letters): an
operator's tool, O(what is there), never on the delivery path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import keys, wire
from relay.commands import Command
from relay.envelope import Envelope, decode_all
from relay.state import deadletter

PAGE = 500
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


# KEYS: the record. ARGV: its size, then per event settled its outcome and that outcome's
# fields (delivered: commands, messageId, relay id; skipped: why, messageId, relay id;
# dead: why, entry, messageId, relay id). One entry each, as XADD from Python wrote them:
# a settlement of hundreds of events sends their values, not hundreds of commands.
# Approximate trimming: Redis drops whole stream nodes, far cheaper than exact.
_RECORD = """
local size, i = ARGV[1], 2
while i <= #ARGV do
  local o = ARGV[i]
  if o == 'dead' then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', size, '*', 'o', o, 'why', ARGV[i + 1],
               'e', ARGV[i + 2], 'm', ARGV[i + 3], 'r', ARGV[i + 4])
    i = i + 5
  else
    local what = o == 'delivered' and 'c' or 'why'
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', size, '*', 'o', o, what, ARGV[i + 1],
               'm', ARGV[i + 2], 'r', ARGV[i + 3])
    i = i + 4
  end
end
return 0
"""


def stage_record(
    pipe: Any,
    size: int,
    *,
    delivered: Iterable[tuple[Envelope, list[Command]]] = (),
    skipped: Iterable[tuple[Envelope, str]] = (),
    dead: Iterable[deadletter.DeadLetter] = (),
) -> None:
    """Queue on the settlement's pipeline: one record entry per event settled."""
    if size <= 0:
        return
    args: list[Any] = []
    for item, commands in delivered:
        sent = orjson.dumps([c.to_dict() for c in commands])
        args += ["delivered", sent, _message_id(item.event), item.id]
    for item, reason in skipped:
        args += ["skipped", reason, _message_id(item.event), item.id]
    for entry in dead:
        # An entry's item as stored: not always an envelope (a message the relay did not write).
        rid = str(entry.item.get("id", ""))
        args += ["dead", entry.reason.value, entry.id, _message_id(entry.item.get("event")), rid]
    if args:
        pipe.eval(_RECORD, 1, keys.TRACE, size, *args)


def _message_id(event: Any) -> str:
    message_id = event.get("messageId") if isinstance(event, dict) else None
    return message_id if isinstance(message_id, str) else ""


def find(
    r: Any, wanted: str, queues: Iterable[str] = (keys.QUEUE, keys.REPLAY_QUEUE)
) -> list[Sighting]:
    """Every place the event with this messageId (or relay id) is, most current first."""
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
    return found


def _recorded(r: Any, wanted: str) -> Iterator[Sighting]:
    last = "+"
    while True:
        page = r.xrevrange(keys.TRACE, max=last, min="-", count=PAGE)
        for stream_id, raw in page:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            if wanted not in (fields.get("m"), fields.get("r")):
                continue
            at = int(stream_id.decode().split("-")[0]) / 1000
            state = fields["o"]
            detail: dict[str, Any] = {"relay_id": fields.get("r"), "message_id": fields.get("m")}
            if state == "delivered":
                detail["commands"] = orjson.loads(fields.get("c", "[]"))
            else:
                detail["reason"] = fields.get("why")
            if state == "dead":
                entry = deadletter.get(r, fields.get("e", ""))
                detail["entry"] = fields.get("e")
                detail["still_dead"] = entry is not None  # replayed or purged since?
            yield Sighting(state, at, detail)
        if len(page) < PAGE:
            return
        last = "(" + page[-1][0].decode()


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
        envelope = orjson.loads(raw)
        if unacked:  # kombu keeps [message, exchange, routing key]
            envelope = envelope[0]
        items = wire.items_of(envelope)
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
