"""Search the flight recorder: settled events by id, user, account, event or outcome.

The engine is DuckDB, embedded in the calling process: SQL over the Parquet files with
no server to run, reading only the columns a query names and skipping the row groups
whose statistics rule a filter out. Lookups by messageId, userId or anonymousId compare
the 64-bit `*_key` columns (files are sorted by `user_key`, so a user's rows sit in few
row groups), then confirm the id itself, since two ids may share a key. A time range
picks the day partitions (`Store.files`); the rest are never opened.

Local files are read by DuckDB itself (`read_parquet`). A bucket's are read through
pyarrow's filesystem of the store, as an Arrow dataset DuckDB scans with its filters
pushed down: DuckDB's own S3 reader (httpfs) is an extension fetched at run time, which a
host without internet access cannot load.

What a search answers also includes the records in Redis that the archiver has not yet
written (relay.state.archive.pending), so an event is found as soon as it is settled. It
hides users forgotten (a Segment delete: their records, by userId or anonymousId, of
events received no later than the delete; the archiver's rule, relay.archive.maintenance.hidden),
and a record written twice (an archiver killed between writing a file and trimming the
stream) is answered once: rows are told apart by relay id, outcome and settle time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.dataset as pads

from relay.archive.schema import COLUMNS, SCHEMA, day_of, key_of, to_table
from relay.archive.store import Store
from relay.errors import RelayError
from relay.state import archive as staged
from relay.state.trace import Sighting

OUTCOMES = ("delivered", "skipped", "dead")
LIMIT = 50
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_JSON = ("commands", "tries", "body")
_RELAY_ID = re.compile(r"^[0-9a-f]{16,}$")  # what ingest and Envelope.new make
# Unix seconds out of the engine: the times' columns as ms since the epoch.
_SELECT = ", ".join(
    f"epoch_ms({c}) AS {c}" if c in ("settled_at", "received_at") else c
    for c in COLUMNS
    if not c.endswith("_key")
)


class QueryError(RelayError):
    """A search or replay filter that cannot be read (a time, an outcome, a limit)."""


def parse_time(text: str, now: float) -> float:
    """Unix seconds of `text`: `now`, or relative to now (`90s`, `15m`, `2h`, `7d`, `1w`:
    that long ago), ISO 8601 (`2026-12-01`, `2026-12-01T06:00`, with an offset or `Z`; UTC when it
    has none), or unix seconds."""
    if text.strip().lower() == "now":
        return now
    found = _RELATIVE.match(text)
    if found:
        return now - float(found[1]) * _UNITS[found[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(
            f"{text!r} is not a time: give now, how long ago (30m, 2h, 7d), a date or date and "
            "time (2026-12-01, 2026-12-01T06:00:00Z, UTC unless it says otherwise) or unix "
            "seconds"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Query:
    """What to look for: every filter given must hold; times are unix seconds."""

    message_id: str | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    account_id: str | None = None
    event: str | None = None
    outcome: str | None = None
    reason: str | None = None
    since: float | None = None
    until: float | None = None
    relay_id: str | None = None  # trace's last resort: no key, a scan of the column

    @classmethod
    def of(cls, filters: dict[str, Any], now: float) -> Query:
        """The query of filters as an operator gives them (times as text: `parse_time`);
        raises QueryError on one that cannot be read. Empty values are no filter."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(filters) - names)
        if unknown:
            raise QueryError(f"unknown filter {unknown[0]!r}")
        given: dict[str, Any] = {
            k: (v.strip() if isinstance(v, str) else v) for k, v in filters.items()
        }
        given = {k: v for k, v in given.items() if v not in (None, "")}
        for bound in ("since", "until"):
            if bound in given and not isinstance(given[bound], int | float):
                given[bound] = parse_time(str(given[bound]), now)
        query = cls(**given)
        if query.outcome is not None and query.outcome not in OUTCOMES:
            raise QueryError(f"outcome is one of {', '.join(OUTCOMES)}, not {query.outcome!r}")
        if query.since is not None and query.until is not None and query.since > query.until:
            raise QueryError("--since is after --until: nothing can match")
        return query

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition and its parameters, the cheap integer tests first."""
        terms: list[str] = []
        params: list[Any] = []
        for key, column, value in (
            ("message_key", "message_id", self.message_id),
            ("user_key", "user_id", self.user_id),
            ("anonymous_key", "anonymous_id", self.anonymous_id),
        ):
            if value is not None:
                terms += [f"{key} = ?", f"{column} = ?"]
                params += [key_of(value), value]
        for column, value in (
            ("account_id", self.account_id), ("event", self.event),
            ("outcome", self.outcome), ("reason", self.reason), ("relay_id", self.relay_id),
        ):  # fmt: skip
            if value is not None:
                terms.append(f"{column} = ?")
                params.append(value)
        if self.since is not None:
            terms.append("settled_at >= make_timestamptz(?::BIGINT * 1000)")
            params.append(round(self.since * 1000))
        if self.until is not None:
            terms.append("settled_at <= make_timestamptz(?::BIGINT * 1000)")
            params.append(round(self.until * 1000))
        return " AND ".join(terms) or "TRUE", params

    def admits(self, record: dict[str, Any]) -> bool:
        """Whether a record as Redis holds it (unix-second times) matches: the records
        not yet archived are filtered as they are read, so a long archiver lag costs a
        search time, not memory."""
        for name in ("message_id", "user_id", "anonymous_id", "account_id", "event",
                     "outcome", "reason", "relay_id"):  # fmt: skip
            wanted = getattr(self, name)
            if wanted is not None and record.get(name) != wanted:
                return False
        at = float(record.get("settled_at") or 0)
        return (self.since is None or at >= self.since) and (self.until is None or at <= self.until)

    def days(self) -> tuple[str | None, str | None]:
        """The first and last day partitions that can hold a match."""
        return (
            None if self.since is None else day_of(self.since),
            None if self.until is None else day_of(self.until),
        )


def search(store: Store, r: Any, query: Query, limit: int = LIMIT) -> list[dict[str, Any]]:
    """The settled events that match, newest first, at most `limit` (`r`: a Redis client
    for the records not yet archived, or None for the files alone)."""
    if limit < 1:
        raise QueryError(f"the limit is at least 1, not {limit}")
    with Reader(store, r, query) as reader:
        return [_hit(row) for row in reader.rows("settled_at DESC, relay_id", limit)]


def sightings(store: Store, r: Any, wanted: str) -> list[Sighting]:
    """`relay trace`'s answer from the archive: each settlement of the event with this
    messageId (or, failing that, relay id), newest first."""
    hits = search(store, r, Query(message_id=wanted), LIMIT)
    if not hits and _RELAY_ID.match(wanted):
        hits = search(store, r, Query(relay_id=wanted), LIMIT)
    out = []
    for hit in hits:
        detail = {
            "relay_id": hit["relay_id"], "message_id": hit["message_id"], "archived": True,
            "commands": hit["commands"] or [], "tries": hit["tries"] or [],
        }  # fmt: skip
        if hit["reason"]:
            detail["reason"] = hit["reason"]
        # The outcomes are trace's settled states: delivered, skipped, dead.
        out.append(Sighting(hit["outcome"], hit["settled_at"], detail))
    return out


def _hit(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON-ready data: times in unix seconds, the JSON columns parsed."""
    for name in ("settled_at", "received_at"):
        if row[name] is not None:
            row[name] = row[name] / 1000
    for name in _JSON:
        row[name] = orjson.loads(row[name]) if row[name] else None
    return row


class Reader:
    """The archive's rows that match a query: the files of its days and the records not
    yet archived, without forgotten users or twice-written records (one DuckDB
    connection; a context manager)."""

    def __init__(self, store: Store, r: Any, query: Query) -> None:
        self._db = duckdb.connect()
        where, params = query.where()
        sources = []
        files = store.files(*query.days())
        if files and store.local:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            sources.append(f"read_parquet([{listed}])")
        elif files:
            self._db.register(
                "archived",
                pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=store.fs),
            )
            sources.append("archived")
        if r is not None:
            admitted = [x for x in staged.pending(r) if query.admits(x)]
            self._db.register("pending", to_table(admitted))
            sources.append("pending")
        self._db.register("forgotten", store.forgotten())
        self._params: list[Any] = []
        selects = []
        for source in sources:
            selects.append(
                f"SELECT {_SELECT} FROM {source} AS a WHERE {where} AND NOT EXISTS "
                "(SELECT 1 FROM forgotten f WHERE f.user_key IN (a.user_key, a.anonymous_key) "
                "AND coalesce(a.received_at, a.settled_at) <= f.forgotten_at)"
            )
            self._params += params
        self._from = (
            "(" + " UNION ALL ".join(selects) + ")" if selects else _empty()
        )  # fmt: skip

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self._db.close()

    def execute(self, template: str, params: Sequence[Any] = ()) -> duckdb.DuckDBPyConnection:
        """Run SQL in which `{rows}` stands for the matching rows (times in ms since the
        epoch); `params` are those of the SQL's own `?`s, after `{rows}`."""
        return self._db.execute(self._sql(template), [*self._params, *params])

    def _sql(self, template: str) -> str:
        rows = (
            f"(SELECT * FROM {self._from} "
            "QUALIFY row_number() OVER (PARTITION BY relay_id, outcome, settled_at) = 1)"
        )
        return template.replace("{rows}", rows)

    def rows(self, order: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The matching rows, in `order` (SQL), at most `limit`."""
        sql = f"SELECT * FROM {{rows}} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cursor = self.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def batches(self, template: str, params: Sequence[Any], size: int) -> Iterator[pa.RecordBatch]:
        """What `execute` answers, as Arrow batches of about `size` rows."""
        relation = self._db.sql(self._sql(template), params=[*self._params, *params])
        yield from relation.to_arrow_reader(size)


def _empty() -> str:
    columns = ", ".join(
        f"NULL::{'BIGINT' if c in ('settled_at', 'received_at', 'attempts') else 'VARCHAR'} AS {c}"
        for c in COLUMNS
        if not c.endswith("_key")
    )
    return f"(SELECT {columns} WHERE FALSE)"
