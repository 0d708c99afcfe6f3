"""What one archived event is: its columns, as Parquet files and as a Redis record.

A record is a dict with the columns below; in Redis (relay.state.archive) its times are
unix seconds, as floats, and its `commands`, `tries` and `body` are JSON text. Every
column but the first five may be null.

    settled_at    when the worker settled it (timestamp, ms, UTC); the partition's day
    received_at   when ingest took it
    relay_id      the relay's id of this copy (relay.envelope.Envelope.id)
    outcome       delivered | skipped | dead
    type          the Segment call: identify, track, group, page, screen, alias, delete
    message_id    Segment's messageId
    user_id       userId
    anonymous_id  anonymousId
    account_id    the ChurnZero account it went to (or would have)
    event         a track's event name
    reason        why it was skipped or dead-lettered (relay.reasons)
    attempts      failed tries before the outcome
    source        api | webhook | operator
    lane          live | replay
    commands      JSON array of the ChurnZero commands sent
    tries         JSON array of each try: {"at": unix s, "status": HTTP status or null,
                  "error": text or null}
    body          the Segment event as ingest accepted it (JSON)
    message_key, user_key, anonymous_key
                  `key_of` of message_id, user_id and anonymous_id (0 for none): lookups
                  compare one 64-bit integer column, and files are sorted by user_key, so
                  a user's rows sit in few row groups whose statistics the engine skips
                  by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

TIME = pa.timestamp("ms", tz="UTC")

SCHEMA = pa.schema(
    [
        pa.field("settled_at", TIME, nullable=False),
        pa.field("received_at", TIME),
        pa.field("relay_id", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("message_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("anonymous_id", pa.string()),
        pa.field("account_id", pa.string()),
        pa.field("event", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("lane", pa.string()),
        pa.field("commands", pa.string()),
        pa.field("tries", pa.string()),
        pa.field("body", pa.string()),
        pa.field("message_key", pa.int64(), nullable=False),
        pa.field("user_key", pa.int64(), nullable=False),
        pa.field("anonymous_key", pa.int64(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)
KEYED = {"message_key": "message_id", "user_key": "user_id", "anonymous_key": "anonymous_id"}
TIMES = ("settled_at", "received_at")

# Users forgotten (a Segment delete): their records settled before `forgotten_at` are
# hidden from search and replay until a compaction rewrites their partitions without them.
FORGOTTEN = pa.schema(
    [
        pa.field("user_key", pa.int64(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("forgotten_at", TIME, nullable=False),
    ]
)


def key_of(text: str | None) -> int:
    """The 64-bit lookup key of an id: the same in every process and version; 0 for none."""
    if not text:
        return 0
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def day_of(settled_at: float) -> str:
    """The partition (UTC day, `YYYY-MM-DD`) of a record settled at `settled_at`."""
    return datetime.fromtimestamp(settled_at, UTC).strftime("%Y-%m-%d")


def to_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The Arrow table of records as Redis holds them (unix-second times, JSON text),
    with the lookup keys computed and the rows sorted by user, then time."""
    rows = list(records)
    names = [name for name in COLUMNS if name not in KEYED]
    return table_of({name: [row.get(name) for row in rows] for name in names})


def table_of(columns: Mapping[str, list[Any]], *, sort: bool = True) -> pa.Table:
    """`to_table` of records given column by column (each column a list, one value per
    record; a column left out is null), the lookup keys computed from their ids; sorted
    unless `sort` is false."""
    size = len(columns["relay_id"])
    out: dict[str, Any] = {}
    for name in COLUMNS:
        if name in KEYED:
            out[name] = [key_of(text) for text in columns.get(KEYED[name]) or [None] * size]
        elif name in TIMES:
            seconds = pa.array(columns.get(name) or [None] * size, pa.float64())
            out[name] = pc.cast(pc.round(pc.multiply(seconds, 1000.0)), pa.int64()).cast(TIME)
        else:
            out[name] = columns.get(name) or [None] * size
    table = pa.Table.from_pydict(out, schema=SCHEMA)
    return table.sort_by(SORTING) if sort else table


SORTING = [("user_key", "ascending"), ("settled_at", "ascending")]
