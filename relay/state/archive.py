"""The archive's records in Redis: settled events the archiver has not yet written.

One `relay:archive` stream entry per settlement, holding a record per event settled
(relay.archive.schema names the columns). Workers add it in the settlement MULTI; the
archiver reads entries, writes them to the archive's files and only then deletes them, so
the stream's length is the archiver's lag. `decode` gives any entry's records as dicts
(times as unix seconds, `commands`/`tries`/`body` as JSON text); `columns` gives them
column by column, as the archiver takes them.

An entry's fields, written by `stage_settled`, so that neither side parses or writes an
event's JSON twice:

    m   {"at": settled_at, "rows": [[relay_id, outcome, type, message_id, user_id,
        anonymous_id, account_id, event, reason, attempts, source, lane, received_at,
        tries], ...]}: the small columns, a row per event (`tries` as JSON, or null)
    b   each event's JSON, in row order, joined by newlines (JSON text has none), zlib
        compressed (ISA-L, as relay.wire compresses queued messages)
    c   each event's commands as a JSON array (empty: none), joined and compressed the
        same way

An entry from `stage_records` holds one field `r` instead: a JSON array of records as
dicts. Both read the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from isal import isal_zlib

from relay import keys
from relay.commands import Command
from relay.envelope import Envelope

if TYPE_CHECKING:  # the archiver reads entries without the queue (Celery, kombu) behind it
    from relay.state import deadletter

FIELD = b"r"
META, BODIES, COMMANDS = b"m", b"b", b"c"
ROW = (
    "relay_id", "outcome", "type", "message_id", "user_id", "anonymous_id", "account_id",
    "event", "reason", "attempts", "source", "lane", "received_at", "tries",
)  # fmt: skip
NAMES = ("settled_at", *ROW, "commands", "body")
NESTED = ("commands", "tries", "body")
DELIVERED, SKIPPED, DEAD = "delivered", "skipped", "dead"
# The fastest level: a settlement's events are alike, so even it compresses them well.
ZLIB_LEVEL = 1


def stage_records(pipe: Any, records: Sequence[dict[str, Any]]) -> None:
    """Queue on the settlement's pipeline: one entry holding these records (dicts)."""
    if records:
        pipe.xadd(keys.ARCHIVE, {FIELD: orjson.dumps(list(records))})


def stage_settled(
    pipe: Any,
    now: float,
    *,
    delivered: Iterable[tuple[Envelope, list[Command]]] = (),
    skipped: Iterable[tuple[Envelope, str]] = (),
    dead: Iterable[deadletter.DeadLetter] = (),
    sent: dict[str, list[Command]] | None = None,
) -> None:
    """Queue on the settlement's pipeline one entry holding a record per event settled:
    `delivered` with its commands, `skipped` with its reason, `dead` letters (with the
    commands `sent` for them, by relay id)."""
    rows: list[list[Any]] = []
    bodies: list[bytes] = []
    commands: list[bytes] = []
    for item, cmds in delivered:
        rows.append(_row(item, DELIVERED, None, cmds))
        bodies.append(orjson.dumps(item.event))
        commands.append(orjson.dumps([c.to_dict() for c in cmds]) if cmds else b"")
    for item, reason in skipped:
        rows.append(_row(item, SKIPPED, str(reason), None))
        bodies.append(orjson.dumps(item.event))
        commands.append(b"")
    for entry in dead:
        record = _dead_record(now, entry, (sent or {}).get(str(entry.item.get("id"))))
        rows.append([record[name] for name in ROW])
        bodies.append(orjson.dumps(record["body"]))
        commands.append(orjson.dumps(record["commands"]) if record["commands"] else b"")
    if rows:
        meta = orjson.dumps({"at": now, "rows": rows})
        fields = {
            META: meta,
            BODIES: isal_zlib.compress(b"\n".join(bodies), ZLIB_LEVEL),
            COMMANDS: isal_zlib.compress(b"\n".join(commands), ZLIB_LEVEL),
        }
        pipe.xadd(keys.ARCHIVE, fields)


def _row(item: Envelope, outcome: str, reason: str | None, cmds: list[Command] | None) -> list[Any]:
    event = item.event
    return [
        item.id, outcome, _text(event.get("type")) or "", _text(event.get("messageId")),
        _text(event.get("userId")), _text(event.get("anonymousId")),
        cmds[0].account if cmds else _account(event), _text(event.get("event")), reason,
        item.attempts, item.source, "replay" if item.replayed_from else "live",
        item.received_at, item.tries,
    ]  # fmt: skip


def settled_records(
    now: float,
    *,
    delivered: Iterable[tuple[Envelope, list[Command]]] = (),
    skipped: Iterable[tuple[Envelope, str]] = (),
    dead: Iterable[deadletter.DeadLetter] = (),
    sent: dict[str, list[Command]] | None = None,
) -> list[dict[str, Any]]:
    """The records `stage_settled` writes, as dicts (`commands`, `tries` and `body` as
    JSON values)."""
    out = [_record(now, item, DELIVERED, None, cmds) for item, cmds in delivered]
    out += [_record(now, item, SKIPPED, str(reason), None) for item, reason in skipped]
    for entry in dead:
        out.append(_dead_record(now, entry, (sent or {}).get(str(entry.item.get("id")))))
    return out


def _record(
    now: float, item: Envelope, outcome: str, reason: str | None, cmds: list[Command] | None
) -> dict[str, Any]:
    record = dict(zip(ROW, _row(item, outcome, reason, cmds), strict=True))
    tries = record["tries"]
    record.update(
        settled_at=now, tries=list(tries) if tries else None, body=item.event,
        commands=[c.to_dict() for c in cmds] if cmds else None,
    )  # fmt: skip
    return record


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
    received = item.get("received_at")
    return {
        "settled_at": now,
        "received_at": received if isinstance(received, int | float) else None,
        "relay_id": str(item.get("id") or ""),
        "outcome": outcome,
        "type": _text(event.get("type")) or "",
        "message_id": _text(event.get("messageId")),
        "user_id": _text(event.get("userId")),
        "anonymous_id": _text(event.get("anonymousId")),
        "account_id": commands[0].account if commands else _account(event),
        "event": _text(event.get("event")),
        "reason": reason,
        "attempts": attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else 0,
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


def columns(fields: dict[bytes, bytes]) -> dict[str, list[Any]]:
    """The records of one stream entry's fields, column by column (`NAMES`): times as
    unix seconds, `commands`/`tries`/`body` as JSON text (or None)."""
    if META not in fields:
        records = decode_dicts(fields)
        return {name: [record.get(name) for record in records] for name in NAMES}
    meta = orjson.loads(fields[META])
    rows = meta["rows"]
    if not rows:
        return {name: [] for name in NAMES}
    out: dict[str, list[Any]] = {
        name: list(values) for name, values in zip(ROW, zip(*rows, strict=True), strict=True)
    }
    out["settled_at"] = [meta["at"]] * len(rows)
    out["tries"] = [orjson.dumps(t).decode() if t else None for t in out["tries"]]
    out["body"] = isal_zlib.decompress(fields[BODIES]).decode().split("\n")
    commands = isal_zlib.decompress(fields[COMMANDS]).decode().split("\n")
    out["commands"] = [c or None for c in commands]
    return out


def decode_dicts(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The records of an entry of `stage_records` (field `r`), nested values as text."""
    raw = fields.get(FIELD)
    records: list[dict[str, Any]] = orjson.loads(raw) if raw else []
    for record in records:
        for name in NESTED:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                record[name] = orjson.dumps(value).decode()
    return records


def decode(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The records of one stream entry's fields, as dicts: times as unix seconds,
    `commands`/`tries`/`body` as JSON text."""
    if META not in fields:
        return decode_dicts(fields)
    cols = columns(fields)
    rows = zip(*(cols[n] for n in NAMES), strict=True)
    return [dict(zip(NAMES, values, strict=True)) for values in rows]


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
