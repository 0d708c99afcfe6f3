"""The archive's upkeep, which the archiver runs at start and hourly (`relay archive
compact` runs it once):

    retention      drop the days older than `archive_days`, whole
    consolidation  merge a day's small files into a few large ones
    compaction     rewrite the files that still hold rows of forgotten users without them

Consolidation. The archiver writes a file per flush (every `archive_flush_s`), thousands
a day under a steady load, and a search opens every file of the days it covers. Once a
file is `SETTLE_S` old (its entries long since trimmed from Redis, so no archiver writes
it again), it is merged with the day's other small ones into a file of up to
`MERGE_BYTES`: its rows sorted by user then time (`schema.SORTING`), in the store's row
groups, a row written twice (equal relay id, outcome and settle time: an archiver that
took over another's entries) kept once, and forgotten users' rows left out. A file of at
least `FULL_BYTES` is left as it is, so a day settles into files of `FULL_BYTES` to
`MERGE_BYTES` and later passes do nothing.

The merged file appears whole (`Store.write_day`) before the files it holds are deleted,
so a crash between the two leaves rows twice, never nowhere: readers drop rows equal in
relay id, outcome and settle time (relay.archive.search), and the next pass merges the
copies into one. One archiver at a time merges a day: the day's lock in Redis
(`keys.ARCHIVE_CONSOLIDATING`) has a TTL, renewed between merges, so a dead archiver's
lock lapses. Should two merge a day at once all the same (a lock that lapsed), each only
deletes files whose rows it has written whole, and skips files the other already deleted:
rows end up twice at worst, until the next pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import redis

from relay import keys
from relay.archive.schema import SCHEMA, SORTING
from relay.archive.store import ROW_GROUP, Store

SETTLE_S = 3600.0  # a file younger than this may still be written again (a takeover)
MERGE_BYTES = 8 * 2**20  # on disk: the files merged at once, so the archiver's memory
FULL_BYTES = MERGE_BYTES // 2  # a file this large is merged no more
LOCK_S = 600.0  # a day's lock outlives a merge of MERGE_BYTES many times over
MERGED = "merged"  # the writer's name in a merged file's name
_KEY_COLUMNS = ["user_key", "anonymous_key", "received_at", "settled_at"]
_UNIQUE = ["relay_id", "outcome", "settled_at"]


def retain(store: Store, days: int, now: float) -> list[str]:
    """Drop the day partitions wholly older than `days` days; the days dropped."""
    cutoff = (datetime.fromtimestamp(now, UTC) - timedelta(days=days)).strftime("%Y-%m-%d")
    dropped = [day for day in store.days() if day < cutoff]
    for day in dropped:
        store.drop_day(day)
    return dropped


def consolidate(store: Store, r: redis.Redis, now: float) -> dict[str, int]:
    """Merge every day's settled small files, each day under its lock (a day another
    archiver holds is left to it); what was done, summed over the days."""
    forgotten = store.forgotten()
    total = {"files_merged": 0, "files_written": 0, "rows_dropped": 0}
    for day in store.days():
        lock = r.lock(keys.ARCHIVE_CONSOLIDATING + day, timeout=LOCK_S, blocking=False)
        if not lock.acquire():
            continue
        try:
            done = consolidate_day(store, day, now, forgotten, renew=lock.reacquire)
        finally:
            # Lapsed (a merge longer than LOCK_S): nothing to release.
            if lock.owned():
                lock.release()
        for name, value in done.items():
            total[name] += value
    return total


def consolidate_day(
    store: Store, day: str, now: float, forgotten: pa.Table,
    renew: Callable[[], object] = lambda: None,
) -> dict[str, int]:  # fmt: skip
    """Merge one day's small files of at least SETTLE_S ago into files of up to
    MERGE_BYTES (see the module docstring); `renew` is called before each merge (it
    raises to stop: the day's lock is lost). What was done."""
    done = {"files_merged": 0, "files_written": 0, "rows_dropped": 0}
    for group in _groups(store.day_files(day), now):
        renew()
        tables, paths = [], []
        for info in group:
            table = _read(store, info.path)
            if table is not None:
                tables.append(table)
                paths.append(info.path)
        if not tables:
            continue
        table = pa.concat_tables(tables)
        keep = _kept(table, forgotten)
        if len(keep):
            store.write_day(day, _parts(table, keep), MERGED)
            done["files_written"] += 1
        for path in paths:  # only now: every row kept is in the file written
            store.remove(path)
        done["files_merged"] += len(paths)
        done["rows_dropped"] += table.num_rows - len(keep)
        del table, tables
        pa.default_memory_pool().release_unused()
    return done


def _groups(files: list[pafs.FileInfo], now: float) -> Iterator[list[pafs.FileInfo]]:
    """The small settled files, in name order, in groups of up to MERGE_BYTES; a group
    of one file is left alone (merging it would change nothing but its name)."""
    # A store that tells no time of writing: old enough (a file written again is only
    # a copy, which the next pass merges away).
    small = sorted(
        (f for f in files if f.size < FULL_BYTES and (f.mtime_ns or 0) / 1e9 <= now - SETTLE_S),
        key=lambda f: f.base_name,
    )
    group: list[pafs.FileInfo] = []
    size = 0
    for info in small:
        if group and size + info.size > MERGE_BYTES:
            if len(group) > 1:
                yield group
            group, size = [], 0
        group.append(info)
        size += info.size
    if len(group) > 1:
        yield group


def _read(store: Store, path: str) -> pa.Table | None:
    """The file's rows, or None when it is gone (merged by another archiver meanwhile:
    its rows are in that one's file)."""
    try:
        return pq.read_table(path, filesystem=store.fs, schema=SCHEMA)
    except OSError:
        if store.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def _kept(table: pa.Table, forgotten: pa.Table) -> pa.Array:
    """The indices of `table`'s rows to keep, in SORTING order: the first of rows equal in
    relay id, outcome and settle time, and none that a delete forgot."""
    index = pa.array(range(table.num_rows), pa.int64())
    unique = table.select(_UNIQUE).append_column("i", index)
    first = unique.group_by(_UNIQUE, use_threads=False).aggregate([("i", "min")])["i_min"]
    keys_only = table.select(_KEY_COLUMNS).take(first)
    first = first.filter(pc.invert(hidden(keys_only, forgotten)))
    order = pc.sort_indices(table.select(["user_key", "settled_at"]).take(first), SORTING)
    return pc.take(first, order)


def _parts(table: pa.Table, keep: pa.Array) -> Iterator[pa.Table]:
    """The kept rows, a row group at a time (a sorted copy of the whole is never held)."""
    for start in range(0, len(keep), ROW_GROUP):
        yield table.take(keep[start : start + ROW_GROUP])


def compact(store: Store) -> dict[str, int]:
    """Rewrite every data file that holds rows of forgotten users without them; the
    files rewritten and the rows removed."""
    forgotten = store.forgotten()
    files = removed = 0
    if forgotten.num_rows == 0:
        return {"files": 0, "rows_removed": 0}
    for path in store.files():
        keys_only = pq.read_table(path, filesystem=store.fs, columns=_KEY_COLUMNS)
        mask = hidden(keys_only, forgotten)
        count = pc.sum(mask).as_py() or 0
        if not count:
            continue
        table = pq.read_table(path, filesystem=store.fs)
        store.replace(path, table.filter(pc.invert(mask)))
        files, removed = files + 1, removed + count
    return {"files": files, "rows_removed": removed}


def hidden(table: pa.Table, forgotten: pa.Table) -> pa.Array:
    """Which rows of `table` (at least its key columns) a delete forgot: the user's or
    anonymous id is a forgotten user's, and the event was received (else settled) no
    later than the delete was received."""
    if forgotten.num_rows == 0 or table.num_rows == 0:
        return pa.array([False] * table.num_rows)
    newest = forgotten.group_by("user_key").aggregate([("forgotten_at", "max")])
    users = newest["user_key"]
    until = pc.cast(newest["forgotten_at_max"], pa.int64())
    when = pc.cast(pc.coalesce(table["received_at"], table["settled_at"]), pa.int64())
    mask = pa.array([False] * table.num_rows)
    for column in ("user_key", "anonymous_key"):
        at = pc.take(until, pc.index_in(table[column], value_set=users))
        mask = pc.or_(mask, pc.fill_null(pc.less_equal(when, at), False))
    return mask


def run(store: Store, r: redis.Redis, days: int, now: float) -> dict[str, Any]:
    """Retention, consolidation, then compaction, once; what each did."""
    dropped = retain(store, days, now)
    merged = consolidate(store, r, now)
    return {"days_dropped": dropped, **merged, **compact(store)}
