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

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import redis
from redis.exceptions import LockError

from relay import keys
from relay.archive.schema import SCHEMA, SORTING
from relay.archive.store import ROW_GROUP, Store

SETTLE_S = 3600.0  # a file younger than this may still be written again (a takeover)
MERGE_BYTES = 4 * 2**20  # on disk: the files merged at once, so the archiver's memory
FULL_BYTES = MERGE_BYTES // 2  # a file this large is merged no more
LOCK_S = 600.0  # a day's lock outlives a merge of MERGE_BYTES many times over
MERGED = "merged"  # the writer's name in a merged file's name
SLICE_ROWS = 4 * ROW_GROUP  # a merged file's rows held at once, as it is written
_KEY_COLUMNS = ["user_key", "anonymous_key", "received_at", "settled_at"]
_UNIQUE = ["relay_id", "outcome", "settled_at"]
_PLAN_COLUMNS = sorted({*_KEY_COLUMNS, *_UNIQUE})


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
            with contextlib.suppress(LockError):
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
        merged = _merge(store, day, [info.path for info in group], forgotten)
        for name, value in merged.items():
            done[name] += value
        pa.default_memory_pool().release_unused()
    return done


def _merge(store: Store, day: str, paths: list[str], forgotten: pa.Table) -> dict[str, int]:
    """Merge the files at `paths` into one (none when no row is kept), then delete them.

    Only their key columns are held whole: the order of the rows kept is worked out on
    those, and the merged file is then written SLICE_ROWS rows at a time, each slice's
    rows taken from the files that hold them."""
    keyed: list[pa.Table] = []
    found: list[str] = []
    for path in paths:
        table = _read(store, path, _PLAN_COLUMNS)
        if table is None:  # merged by another archiver meanwhile: its rows are in its file
            continue
        keyed.append(
            table.append_column("file", pa.array([len(found)] * table.num_rows, pa.int32()))
            .append_column("row", pa.array(range(table.num_rows), pa.int64()))
        )  # fmt: skip
        found.append(path)
    if not found:
        return {}
    table = pa.concat_tables(keyed)
    plan = table.select(["file", "row"]).take(_kept(table, forgotten))
    if plan.num_rows:
        store.write_day(day, _slices(store, found, plan), MERGED)
    for path in found:  # only now: every row kept is in the file written, whole
        store.remove(path)
    return {
        "files_merged": len(found),
        "files_written": int(plan.num_rows > 0),
        "rows_dropped": table.num_rows - plan.num_rows,
    }


def _slices(store: Store, paths: list[str], plan: pa.Table) -> Iterator[pa.Table]:
    """The rows `plan` names (file number, row number), in its order, SLICE_ROWS at a time."""
    for start in range(0, plan.num_rows, SLICE_ROWS):
        part = plan.slice(start, SLICE_ROWS)
        at = pa.array(range(part.num_rows), pa.int64())
        pieces = []
        for number in pc.unique(part["file"]).to_pylist():
            mine = pc.equal(part["file"], number)
            table = _read(store, paths[number])
            if table is None:
                # Another archiver merged it meanwhile (the day's lock lapsed): this merge
                # is abandoned, and its files kept, before anything is deleted.
                raise FileNotFoundError(paths[number])
            rows = table.take(pc.filter(part["row"], mine))
            pieces.append(rows.append_column("at", pc.filter(at, mine)))
        merged = pa.concat_tables(pieces)
        yield merged.take(pc.sort_indices(merged["at"])).drop_columns(["at"])


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


def _read(store: Store, path: str, columns: list[str] | None = None) -> pa.Table | None:
    """The file's rows (their `columns`, else all), or None when it is gone."""
    try:
        return pq.read_table(path, filesystem=store.fs, schema=SCHEMA, columns=columns)
    except OSError:
        if store.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def _kept(table: pa.Table, forgotten: pa.Table) -> pa.Array:
    """The indices of `table`'s rows to keep, in SORTING order: the first of rows equal in
    relay id, outcome and settle time, and none that a delete forgot."""
    # Sorted by user, time, then relay id and outcome, a row's copies are its neighbours.
    order = pc.sort_indices(table, [*SORTING, ("relay_id", "ascending"), ("outcome", "ascending")])
    if len(order) > 1:
        rows = table.select(_UNIQUE).take(order)
        again = pc.equal(rows["relay_id"][1:], rows["relay_id"][:-1])
        for name in ("outcome", "settled_at"):
            again = pc.and_(again, pc.equal(rows[name][1:], rows[name][:-1]))
        first = pa.concat_arrays([pa.array([True]), pc.invert(again).combine_chunks()])
        order = order.filter(first)
    return order.filter(pc.invert(hidden(table.select(_KEY_COLUMNS).take(order), forgotten)))


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
