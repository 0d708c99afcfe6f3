"""Replay a slice of the archive: its events sent again, with the current mapping.

A replay re-queues the archived events (each record's `body`, the event as ingest
accepted it) that match a query, on the replay lane (keys.REPLAY_QUEUE, the lane
`relay dlq replay` uses: a bounded share of the rate while live events flow), oldest
first. An event the archive holds twice (dead-lettered, then delivered by a dead-letter
replay) is sent once, as its newest record has it.

Each replayed event keeps its relay id and messageId, so the worker's duplicate check
treats it as the same copy again (relay.delivery.dedupe): within the dedupe window of
its first delivery, an event already delivered is skipped as `duplicate`, and one
skipped or dead-lettered is delivered; past the window, every event is delivered again,
and a replayed track is a second event in ChurnZero's history.

A replay is named by its filters as the operator wrote them (`Replay.of`): running the
same command again continues it. Its state (`keys.ARCHIVE_REPLAY` + id, a HASH) holds the
absolute time range the first run resolved (`--since 2h` means the same hours on every
run) and its cursor, the (settle time, relay id) of the last event queued; events go in
that order, and each page is queued and the cursor moved in one MULTI, so an interrupted
replay has queued exactly the events before its cursor and none twice. Two runs of one
replay at once cannot both queue a page: the MULTI is WATCHed on the state.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from relay import keys
from relay.archive.search import Query, QueryError, Reader
from relay.archive.store import Store
from relay.envelope import Envelope
from relay.state import broker

PAGE = 2000
STATE_TTL_S = 7 * 86400  # a replay can be continued for a week after its last step
# Records the replay orders and pages by, newest record of each relay id only.
_SLICE = "QUALIFY row_number() OVER (PARTITION BY relay_id ORDER BY settled_at DESC, outcome) = 1"


_COLUMNS = "settled_at, relay_id, source, type, user_id, body"  # what a replay sends


class ReplayBusy(QueryError):
    """Another run of the same replay moved its cursor meanwhile."""


@dataclass(frozen=True)
class Step:
    """Where a replay stands after a page: events queued so far of the slice's total."""

    done: int
    total: int
    skipped: int  # records without an event to send (no body)


@dataclass
class Replay:
    """One replay: its id, the query it replays, and its progress."""

    id: str
    query: Query
    filters: dict[str, str]
    done: int = 0
    skipped: int = 0
    cursor: tuple[int, str] | None = None  # (settled_at in ms, relay id) of the last queued
    started_at: float | None = None

    @staticmethod
    def id_of(filters: dict[str, str]) -> str:
        """The replay id of filters as written: the same command, the same replay."""
        given = {k: v for k, v in sorted(filters.items()) if v not in (None, "")}
        return hashlib.blake2b(orjson.dumps(given), digest_size=6).hexdigest()

    @classmethod
    def of(cls, r: Any, filters: dict[str, str], now: float | None = None) -> Replay:
        """The replay of these filters (`since` and `until` required): the one under way
        or done, with the times its first run resolved, or a new one (not yet stored)."""
        if not filters.get("since") or not filters.get("until"):
            raise QueryError("a replay needs --since and --until")
        rid = cls.id_of(filters)
        saved = r.hgetall(keys.ARCHIVE_REPLAY + rid)
        if not saved:
            now = time.time() if now is None else now
            return cls(rid, Query.of(filters, now), dict(filters))
        state = {k.decode(): v.decode() for k, v in saved.items()}
        resolved = {**filters, "since": float(state["since"]), "until": float(state["until"])}
        cursor = None
        if state.get("cursor_at"):
            cursor = (int(state["cursor_at"]), state["cursor_id"])
        return cls(
            rid, Query.of(resolved, 0), dict(filters), done=int(state.get("done", 0)),
            skipped=int(state.get("skipped", 0)), cursor=cursor,
            started_at=float(state["started_at"]),
        )  # fmt: skip

    @property
    def lane_tag(self) -> str:
        """What the replayed envelopes' `replayed_from` says: this replay."""
        return f"archive:{self.id}"

    def reader(self, store: Store, r: Any) -> Reader:
        """The slice's records (archived and not yet archived); a context manager."""
        return Reader(store, r, self.query)

    def total(self, reader: Reader) -> int:
        """How many events the slice holds, already replayed ones included."""
        found = reader.execute(f"SELECT count(*) FROM (SELECT relay_id FROM {{rows}} {_SLICE})")
        return int(found.fetchall()[0][0])

    def pages(self, reader: Reader, size: int = PAGE) -> Iterator[list[dict[str, Any]]]:
        """The records still to replay, oldest first, in pages."""
        after: str = ""
        params: list[Any] = []
        if self.cursor is not None:
            after = "WHERE settled_at > ? OR (settled_at = ? AND relay_id > ?)"
            params = [self.cursor[0], self.cursor[0], self.cursor[1]]
        sql = (
            f"SELECT {_COLUMNS} FROM (SELECT * FROM {{rows}} {_SLICE}) {after} "
            "ORDER BY settled_at, relay_id"
        )
        for batch in reader.batches(sql, params, size):
            yield batch.to_pylist()

    def run(
        self, r: redis.Redis, store: Store, queue: broker.Queue, per_message: int | None = None,
        *, total: int | None = None, now: float | None = None, page_size: int = PAGE,
    ) -> Iterator[Step]:  # fmt: skip
        """Queue the rest of the slice, a page at a time; yields after each page.
        Raises ReplayBusy when another run of this replay moved the cursor meanwhile."""
        with self.reader(store, r) as reader:
            total = self.total(reader) if total is None else total
            self._save_start(r, total, now)
            for page in self.pages(reader, page_size):
                items, skipped = [], 0
                at = time.time() if now is None else now
                for record in page:
                    item = self.item(record, at)
                    if item is None:
                        skipped += 1
                    else:
                        items.append(item)
                last = page[-1]
                self._queue(
                    r, queue, items, skipped, (last["settled_at"], last["relay_id"]), per_message
                )
                yield Step(self.done, total, self.skipped)

    def envelope(self, record: dict[str, Any], now: float) -> Envelope | None:
        """The envelope that replays a record, or None when it holds no event."""
        item = self.item(record, now)
        return None if item is None else Envelope.from_dict(item)

    def item(self, record: dict[str, Any], now: float) -> dict[str, Any] | None:
        """`envelope(record, now).to_dict()`, built directly (a replay queues many), or
        None when the record holds no event."""
        try:
            event = orjson.loads(record["body"]) if record.get("body") else None
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return None
        return {
            "id": record["relay_id"], "source": record.get("source") or "api",
            "received_at": now, "attempts": 0, "event": event, "replayed_from": self.lane_tag,
        }  # fmt: skip

    def _save_start(self, r: Any, total: int, now: float | None) -> None:
        """Record the replay's resolved range (a first run's; together or not at all,
        and never over another run's) and the slice's size."""
        key = keys.ARCHIVE_REPLAY + self.id
        assert self.query.since is not None and self.query.until is not None
        pipe = r.pipeline(transaction=True)
        if self.started_at is None:
            self.started_at = time.time() if now is None else now
            for name, value in (
                ("started_at", self.started_at), ("since", self.query.since),
                ("until", self.query.until), ("filters", orjson.dumps(self.filters)),
            ):  # fmt: skip
                pipe.hsetnx(key, name, value)
        pipe.hset(key, "total", total)
        pipe.expire(key, STATE_TTL_S)
        pipe.execute()

    def _queue(
        self, r: redis.Redis, queue: broker.Queue, items: list[dict[str, Any]], skipped: int,
        cursor: tuple[int, str], per_message: int | None,
    ) -> None:  # fmt: skip
        key = keys.ARCHIVE_REPLAY + self.id
        with r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                now_at = pipe.hget(key, "cursor_at")
                expected = None if self.cursor is None else str(self.cursor[0]).encode()
                if now_at != expected:
                    raise ReplayBusy(
                        f"replay {self.id} moved on meanwhile: another run of it is going"
                    )
                pipe.multi()
                if items:
                    name, messages = queue.messages(items, per_message)
                    for message in messages:
                        pipe.lpush(name, message)
                    pipe.incrby(keys.DEPTH_READY, len(items))
                    pipe.hincrby(keys.STATS, keys.Stat.REPLAYED, len(items))
                pipe.hincrby(key, "done", len(items))
                pipe.hincrby(key, "skipped", skipped)
                pipe.hset(key, mapping={"cursor_at": cursor[0], "cursor_id": cursor[1]})
                pipe.expire(key, STATE_TTL_S)
                pipe.execute()
            except redis.WatchError:
                raise ReplayBusy(
                    f"replay {self.id} moved on meanwhile: another run of it is going"
                ) from None
        self.cursor = cursor
        self.done += len(items)
        self.skipped += skipped
