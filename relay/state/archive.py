"""The archive's records in Redis: settled events the archiver has not yet written.

One `relay:archive` stream entry per settlement, field `r`: a JSON array of records
(relay.archive.schema: times as unix seconds). Workers add it in the settlement MULTI; the
archiver reads entries, writes them to the archive's files and only then deletes them, so
the stream's length is the archiver's lag.

A worker writes `commands`, `tries` and `body` as nested JSON (one encode per
settlement, not three per event); `decode` gives them as JSON text, as the files hold
them, whichever way an entry has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from relay import keys
from relay.commands import Command
from relay.envelope import Envelope
from relay.state import deadletter

FIELD = b"r"
NESTED = ("commands", "tries", "body")
DELIVERED, SKIPPED, DEAD = "delivered", "skipped", "dead"


def stage_records(pipe: Any, records: Sequence[dict[str, Any]]) -> None:
    """Queue on the settlement's pipeline: one entry holding these records."""
    if records:
        pipe.xadd(keys.ARCHIVE, {FIELD: orjson.dumps(list(records))})


def settled_records(
    now: float,
    *,
    delivered: Iterable[tuple[Envelope, list[Command]]] = (),
    skipped: Iterable[tuple[Envelope, str]] = (),
    dead: Iterable[deadletter.DeadLetter] = (),
    sent: dict[str, list[Command]] | None = None,
) -> list[dict[str, Any]]:
    """One record per event of a settlement: `delivered` with its commands, `skipped` with
    its reason, `dead` letters (with the commands `sent` for them, by relay id)."""
    out = [_record(now, item, DELIVERED, None, commands) for item, commands in delivered]
    out += [_record(now, item, SKIPPED, str(reason), None) for item, reason in skipped]
    for entry in dead:
        item = entry.item
        commands = (sent or {}).get(str(item.get("id")))
        out.append(_dead_record(now, entry, commands))
    return out


def _record(
    now: float, item: Envelope, outcome: str, reason: str | None, commands: list[Command] | None
) -> dict[str, Any]:
    event = item.event
    cmds = [c.to_dict() for c in commands] if commands else None
    return {
        "settled_at": now,
        "received_at": item.received_at,
        "relay_id": item.id,
        "outcome": outcome,
        "type": _text(event.get("type")) or "",
        "message_id": _text(event.get("messageId")),
        "user_id": _text(event.get("userId")),
        "anonymous_id": _text(event.get("anonymousId")),
        "account_id": commands[0].account if commands else _account(event),
        "event": _text(event.get("event")),
        "reason": reason,
        "attempts": item.attempts,
        "source": item.source,
        "lane": "replay" if item.replayed_from else "live",
        "commands": cmds,
        "tries": list(item.tries) if item.tries else None,
        "body": event,
    }


def _dead_record(
    now: float, entry: deadletter.DeadLetter, commands: list[Command] | None
) -> dict[str, Any]:
    record = item_record(now, entry.item, DEAD, entry.reason.value, commands)
    record["relay_id"] = record["relay_id"] or entry.id
    record["attempts"] = entry.attempts
    return record


def item_record(
    now: float, item: dict[str, Any], outcome: str, reason: str | None,
    commands: list[Command] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The record of an event settled from its queued item as stored (not always an
    envelope: a message the relay did not write)."""
    event = item.get("event")
    event = event if isinstance(event, dict) else {}
    tries = item.get("tries")
    attempts = item.get("attempts")
    return {
        "settled_at": now,
        "received_at": item.get("received_at"),
        "relay_id": str(item.get("id") or ""),
        "outcome": outcome,
        "type": _text(event.get("type")) or "",
        "message_id": _text(event.get("messageId")),
        "user_id": _text(event.get("userId")),
        "anonymous_id": _text(event.get("anonymousId")),
        "account_id": commands[0].account if commands else _account(event),
        "event": _text(event.get("event")),
        "reason": reason,
        "attempts": attempts if isinstance(attempts, int) else 0,
        "source": _text(item.get("source")),
        "lane": "replay" if item.get("replayed_from") else "live",
        "commands": [c.to_dict() for c in commands] if commands else None,
        "tries": tries if isinstance(tries, list) and tries else None,
        "body": item.get("event"),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _account(event: dict[str, Any]) -> str | None:
    # Without commands, the account the event names itself (a group call's groupId).
    return _text(event.get("groupId"))


def decode(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The records of one stream entry's fields, `commands`/`tries`/`body` as JSON text."""
    raw = fields.get(FIELD)
    records: list[dict[str, Any]] = orjson.loads(raw) if raw else []
    for record in records:
        for name in NESTED:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                record[name] = orjson.dumps(value).decode()
    return records


def pending(client: Any, page: int = 500) -> Iterator[dict[str, Any]]:
    """Every record not yet archived, oldest first (read-only: search's newest minutes)."""
    start = "-"
    while True:
        entries = client.xrange(keys.ARCHIVE, start, "+", count=page)
        for _id, fields in entries:
            yield from decode(fields)
        if len(entries) < page:
            return
        start = "(" + (
            entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        )


def lag(client: Any, now: float) -> dict[str, float]:
    """The archiver's lag: entries (settlements) in the stream, and the age (s) of the
    oldest (0 when none)."""
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.ARCHIVE)
    pipe.xrange(keys.ARCHIVE, "-", "+", count=1)
    length, first = pipe.execute()
    age = 0.0
    if first:
        entry_id = first[0][0]
        ms = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
        age = max(now - ms / 1000, 0.0)
    return {"entries": int(length or 0), "oldest_age_s": round(age, 3)}
