"""The archive's records in Redis: settled events the archiver has not yet written.

One `relay:archive` stream entry per settlement, field `r`: a JSON array of records
(relay.archive.schema: times as unix seconds, `commands`/`tries`/`body` as JSON text).
Workers add it in the settlement MULTI; the archiver reads entries, writes them to the
archive's files and only then deletes them, so the stream's length is the archiver's lag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from relay import keys

FIELD = b"r"


def stage_records(pipe: Any, records: Sequence[dict[str, Any]]) -> None:
    """Queue on the settlement's pipeline: one entry holding these records."""
    if records:
        pipe.xadd(keys.ARCHIVE, {FIELD: orjson.dumps(list(records))})


def decode(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The records of one stream entry's fields."""
    raw = fields.get(FIELD)
    return orjson.loads(raw) if raw else []


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
