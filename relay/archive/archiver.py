"""The archiver: moves settled events' records from Redis into the archive's files.

    read      XREADGROUP on `relay:archive` as one consumer of the `archivers` group:
              archivers on several hosts share the entries; one that died leaves its
              entries pending, and another takes them (XAUTOCLAIM) once they idle for
              a few flushes' time
    gather    until `archive_flush_s` has passed since the first record, or
              `FLUSH_RECORDS`, `FLUSH_BYTES` or `FLUSH_ENTRIES` are held
    write     one Parquet file per day the records were settled on (relay.archive.store),
              named after the first entry it holds; the users that honoured deletes
              forgot, to `forgotten/` first
    remove    XACK and XDEL the entries, and count them, in one MULTI: Redis holds only
              what is not yet written

An archiver killed between its write and its XDEL leaves its entries pending: the one
that takes them over writes them under the same name, replacing the file rather than
adding a copy, so every record is in the files once (readers that also drop rows equal
in relay_id, outcome and settled_at lose nothing: `schema.UNIQUE`).

Maintenance, at start and every `MAINTENANCE_S` (relay.archive.maintenance): retention
drops the days older than `archive_days`, consolidation merges each day's small files
into a few large ones, and compaction rewrites the files that still hold rows of
forgotten users (search and replay hide them from the moment their delete is archived).

Runs in a process of its own (`relay archive`, or the child `relay worker` supervises):
pyarrow is imported here, never in a delivery process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pyarrow as pa
import redis
import structlog

from relay import keys
from relay.archive import maintenance
from relay.archive.schema import FORGOTTEN, SORTING, key_of, table_of
from relay.archive.store import Store, open_store
from relay.reasons import Skip
from relay.settings import Settings
from relay.state import archive

log = structlog.get_logger("relay.archive")

READ_COUNT = 16  # entries per XREADGROUP (a settlement's entry holds up to a message's events)
FLUSH_ENTRIES = 2_000  # settlements per file at most (a taken-over batch is as large)
FLUSH_BYTES = 16 * 2**20  # entries' bytes held before a write, whatever the time
FLUSH_RECORDS = 10_000  # records held before a write: the archiver's memory is about these
# An entry pending this long (and at least CLAIM_MIN_S) belongs to an archiver that
# died; taking over one that still writes costs only work: it writes the same file.
CLAIM_FLUSHES = 4
CLAIM_MIN_S = 10.0
GONE_CONSUMER_S = 3600.0  # a consumer idle this long with nothing pending is forgotten
MAINTENANCE_S = 3600.0
BACKOFF_CAP_S = 30.0


@dataclass
class Batch:
    """Stream entries read and not yet written: their ids, their records as Arrow tables
    (converted as they are read: a Python dict per record would hold many times the
    memory), the users their deletes forgot, and their JSON size."""

    ids: list[str] = field(default_factory=list)
    tables: list[pa.Table] = field(default_factory=list)
    forgotten: dict[str, float] = field(default_factory=dict)
    records: int = 0
    size: int = 0
    since: float = 0.0  # monotonic time of its first entry

    def add(self, entries: list[tuple[Any, dict[bytes, bytes]]], now: float) -> None:
        """Take stream entries (id, fields)."""
        if not entries:
            return
        # Everything converted before anything is kept: entries that fail to convert
        # stay pending (and are counted as errors), never half taken.
        columns: dict[str, list[Any]] = {name: [] for name in archive.NAMES}
        for _id, fields in entries:
            for name, values in archive.columns(fields).items():
                columns[name] += values
        table = table_of(columns, sort=False) if columns["relay_id"] else None
        if not self.ids:
            self.since = now
        for entry_id, fields in entries:
            self.ids.append(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
            self.size += sum(len(value) for value in fields.values())
        for user, at in forgotten_users(columns).items():
            self.forgotten[user] = max(at, self.forgotten.get(user, 0.0))
        if table is not None:
            self.tables.append(table)
            self.records += table.num_rows

    def table(self) -> pa.Table:
        """Every record held, sorted as `schema.to_table` sorts them."""
        table = pa.concat_tables(self.tables) if len(self.tables) > 1 else self.tables[0]
        return table.sort_by(SORTING)


class Archiver:
    """One archiver process's work (see the module docstring)."""

    def __init__(
        self, settings: Settings, r: redis.Redis, store: Store, name: str | None = None
    ) -> None:
        self.settings = settings
        self.redis = r
        self.store = store
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.flush_s = settings.archive_flush_s
        self.claim_idle_s = max(CLAIM_FLUSHES * self.flush_s, CLAIM_MIN_S)
        self.batch = Batch()
        self.stopping = threading.Event()
        self._group_ready = False

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Archive until `stop`; then write what is held and return. Errors (Redis or
        the store away) are logged, counted and retried with a growing pause."""
        failures = 0
        next_maintenance = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() >= next_maintenance:
                    # Due again in an hour even if it fails: archiving goes on meanwhile.
                    next_maintenance = time.monotonic() + MAINTENANCE_S
                    self.maintain()
                self.step()
                failures = 0
            except Exception as exc:
                failures += 1
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    # The stream went with its group (a Redis that came back empty): make
                    # them again, or every later read fails the same way.
                    self._group_ready = False
                self._failed("redis" if isinstance(exc, redis.RedisError) else "store", exc)
                self.stopping.wait(min(2.0**failures / 4, BACKOFF_CAP_S))
        try:
            self.flush()
        except Exception as exc:  # taken over by another archiver once idle
            self._failed("redis" if isinstance(exc, redis.RedisError) else "store", exc)

    def stop(self) -> None:
        """Ask `run` to write what it holds and return."""
        self.stopping.set()

    def step(self) -> None:
        """Take over a dead archiver's entries, read new ones, and write when due."""
        self._ensure_group()
        if not self.batch.ids and self._take_over():
            return
        wait_s = self.flush_s
        if self.batch.ids:
            wait_s = max(self.flush_s - (time.monotonic() - self.batch.since), 0.0)
        if not self._due() and wait_s > 0:
            found: Any = self.redis.xreadgroup(
                keys.ARCHIVE_GROUP, self.name, {keys.ARCHIVE: ">"},
                count=READ_COUNT, block=max(int(min(wait_s, 1.0) * 1000), 1),
            )  # fmt: skip
            for _stream, entries in found or []:
                self.batch.add(entries, time.monotonic())
        if self._due():
            self.flush()

    def _due(self) -> bool:
        batch = self.batch
        if not batch.ids:
            return False
        return (
            len(batch.ids) >= FLUSH_ENTRIES or batch.size >= FLUSH_BYTES
            or batch.records >= FLUSH_RECORDS
            or time.monotonic() - batch.since >= self.flush_s or self.stopping.is_set()
        )  # fmt: skip

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # From the stream's first entry: records written before any archiver ran.
            self.redis.xgroup_create(keys.ARCHIVE, keys.ARCHIVE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _take_over(self) -> bool:
        """Claim entries a dead archiver held and write them at once, as one batch;
        whether there were any."""
        reply: Any = self.redis.xautoclaim(
            keys.ARCHIVE, keys.ARCHIVE_GROUP, self.name, int(self.claim_idle_s * 1000),
            start_id="0-0", count=FLUSH_ENTRIES,
        )  # fmt: skip
        entries = [(i, f) for i, f in reply[1] if f]
        gone = [i for i, f in reply[1] if not f] + list(reply[2] if len(reply) > 2 else [])
        if gone:  # deleted from the stream but still pending: written already
            self.redis.xack(keys.ARCHIVE, keys.ARCHIVE_GROUP, *gone)
        if not entries:
            return False
        self.batch.add(entries, time.monotonic())
        log.info("archive_taken_over", entries=len(entries), first=self.batch.ids[0])
        self.flush()
        return True

    # -- writing -------------------------------------------------------------------------

    def flush(self) -> int:
        """Write the batch held, then remove its entries from Redis; the records written."""
        batch = self.batch
        if not batch.ids:
            return 0
        name = "s" + batch.ids[0]
        if batch.forgotten:
            self.store.forget(forgotten_table(batch.forgotten), self.name, name=name)
        if batch.records:
            self.store.write(batch.table(), self.name, name=name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(keys.ARCHIVE, keys.ARCHIVE_GROUP, *batch.ids)
        pipe.xdel(keys.ARCHIVE, *batch.ids)
        pipe.hincrby(keys.STATS, keys.Stat.ARCHIVED, batch.records)
        pipe.execute()
        log.info(
            "archived", records=batch.records, entries=len(batch.ids), file=name,
            forgotten=len(batch.forgotten),
        )  # fmt: skip
        self.batch = Batch()
        # An allocator keeps what it freed for a while: give it back between files.
        pa.default_memory_pool().release_unused()
        return batch.records

    def _failed(self, what: str, exc: Exception) -> None:
        log.error("archiver_failed", what=what, error=f"{type(exc).__name__}: {exc}"[:500])
        with contextlib.suppress(redis.RedisError):  # Redis failed: the log line says so
            self.redis.hincrby(keys.STATS, keys.Stat.ARCHIVER_ERRORS.of(what), 1)

    # -- maintenance ---------------------------------------------------------------------

    def maintain(self, now: float | None = None) -> dict[str, Any]:
        """Retention, consolidation and compaction (relay.archive.maintenance); what each did."""
        now = time.time() if now is None else now
        self._ensure_group()
        for consumer in self.redis.xinfo_consumers(keys.ARCHIVE, keys.ARCHIVE_GROUP):
            idle_s = int(consumer.get("idle", 0)) / 1000
            if not consumer.get("pending") and idle_s > GONE_CONSUMER_S:
                self.redis.xgroup_delconsumer(keys.ARCHIVE, keys.ARCHIVE_GROUP, consumer["name"])
        done = maintenance.run(self.store, self.redis, self.settings.archive_days, now)
        if any(done.values()):
            log.info("archive_maintained", **done)
        return done


def forgotten_users(columns: dict[str, list[Any]]) -> dict[str, float]:
    """The users that the honoured deletes among records (column by column, as
    `relay.state.archive.columns` gives them) forgot, each with the delete's receipt (the
    newest one's, for a user deleted twice)."""
    out: dict[str, float] = {}
    for n, kind in enumerate(columns["type"]):
        if kind != "delete" or columns["reason"][n] != Skip.DELETE_REQUEST:
            continue
        user = columns["user_id"][n] or columns["anonymous_id"][n]
        if user:
            at = float(columns["received_at"][n] or columns["settled_at"][n])
            out[user] = max(at, out.get(user, 0.0))
    return out


def forgotten_table(users: dict[str, float]) -> pa.Table:
    """schema.FORGOTTEN rows of users forgotten at the given times (unix seconds)."""
    return pa.Table.from_pydict(
        {
            "user_key": [key_of(u) for u in users],
            "user_id": list(users),
            "forgotten_at": [round(at * 1000) for at in users.values()],
        },
        schema=FORGOTTEN,
    )


def main(settings: Settings, r: redis.Redis) -> int:
    """`relay archive`: archive until SIGTERM or SIGINT; the exit status."""
    # One thread for Arrow's work (sorting, compressing): the archiver takes at most a
    # core from the delivery processes beside it.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    # The C allocator (two arenas, as the supervisor sets) gives freed memory back to the
    # system on `release_unused`; Arrow's default allocator keeps more of it, for longer.
    pa.set_memory_pool(pa.system_memory_pool())
    archiver = Archiver(settings, r, open_store(settings))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        archiver.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    log.info("archiver_started", consumer=archiver.name, store=archiver.store.root)
    archiver.run()
    return 0
