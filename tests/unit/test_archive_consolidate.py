"""Consolidation of a day's small files, on a local disk (the lock: tests/integration)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relay.archive import archiver, maintenance, schema, search
from relay.archive.store import ROW_GROUP, Store, open_store
from relay.settings import Settings

DAY = 1_796_688_000.0  # 2026-12-08T00:00:00Z
TODAY = "2026-12-08"


def record(i: int, user: str | None = None) -> dict[str, object]:
    at = DAY + 60 + i
    return {
        "settled_at": at, "received_at": at - 1, "relay_id": f"{i:032x}",
        "outcome": "delivered", "type": "track", "message_id": f"m{i}",
        "user_id": user or f"u{i % 7}", "event": "Login", "body": '{"type":"track"}',
    }  # fmt: skip


def small_files(store: Store, count: int, per_file: int) -> list[dict[str, object]]:
    """`count` files as the archiver writes them (named after a stream entry); the
    records written."""
    rows = []
    for n in range(count):
        batch = [record(n * per_file + k) for k in range(per_file)]
        store.write(schema.to_table(batch), "a1", name=f"s{1_796_688_060_000 + n}-0")
        rows += batch
    return rows


def settled() -> float:
    """A time at which every file just written is old enough to merge."""
    return time.time() + maintenance.SETTLE_S + 1


def rows_of(store: Store) -> list[dict[str, object]]:
    return pa.concat_tables(pq.read_table(p) for p in store.files()).to_pylist()


def test_a_days_small_files_become_one_sorted_file_each_record_once(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    rows = small_files(store, 40, 500)
    # An archiver that took over another's entries wrote a second copy of one file.
    again = [record(k) for k in range(500)]
    store.write(schema.to_table(again), "a2", name="s1796688099999-0")
    before = store.files()
    done = maintenance.consolidate_day(store, TODAY, settled(), store.forgotten())
    assert done == {"files_merged": 41, "files_written": 1, "rows_dropped": 500}
    [merged] = store.files()
    assert merged not in before and not list(tmp_path.rglob("*.tmp"))
    table = pq.read_table(merged)
    assert table.schema.equals(schema.SCHEMA)
    assert sorted(table["relay_id"].to_pylist()) == sorted(str(r["relay_id"]) for r in rows)
    assert table.select(["user_key", "settled_at"]) == table.select(
        ["user_key", "settled_at"]
    ).sort_by(schema.SORTING)
    meta = pq.ParquetFile(merged).metadata
    assert meta.num_row_groups == -(-len(rows) // ROW_GROUP)
    # A day of one file is left as it is.
    assert maintenance.consolidate_day(store, TODAY, settled(), store.forgotten()) == {
        "files_merged": 0, "files_written": 0, "rows_dropped": 0,
    }  # fmt: skip
    assert store.files() == [merged]


def test_files_still_young_are_left_to_the_archiver(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    small_files(store, 5, 10)
    before = sorted(store.files())
    done = maintenance.consolidate_day(store, TODAY, time.time(), store.forgotten())
    assert done["files_merged"] == 0 and sorted(store.files()) == before


def test_forgotten_users_rows_are_left_out_of_the_merged_file(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    small_files(store, 3, 10)
    store.write(schema.to_table([record(999, user="gone")]), "a1", name="s1796688070000-0")
    store.forget(archiver.forgotten_table({"gone": DAY + 1100}), "a1")
    # The user came back after the delete: kept.
    store.write(schema.to_table([record(1100, user="gone")]), "a1", name="s1796688080000-0")
    done = maintenance.consolidate_day(store, TODAY, settled(), store.forgotten())
    assert done["rows_dropped"] == 1
    gone = [row["relay_id"] for row in rows_of(store) if row["user_id"] == "gone"]
    assert gone == [f"{1100:032x}"] and len(rows_of(store)) == 31


def test_a_crash_between_the_write_and_the_deletes_shows_each_record_once(
    tmp_path: Path,
) -> None:
    store = open_store(Settings(archive_dir=tmp_path / "archive"))
    rows = small_files(store, 12, 25)
    # The merged file written beside the small ones, none of them deleted yet.
    shutil.copytree(tmp_path / "archive", tmp_path / "copy")
    copy = open_store(Settings(archive_dir=tmp_path / "copy"))
    maintenance.consolidate_day(copy, TODAY, settled(), copy.forgotten())
    [merged] = copy.files()
    shutil.copy(merged, Path(store.root) / f"day={TODAY}" / Path(merged).name)
    assert len(store.files()) == 13 and len(rows_of(store)) == 2 * len(rows)
    hits = search.search(store, None, search.Query(user_id="u3"), limit=1000)
    assert sorted(h["relay_id"] for h in hits) == sorted(
        str(r["relay_id"]) for r in rows if r["user_id"] == "u3"
    )
    # The next pass merges the copies into one.
    maintenance.consolidate_day(store, TODAY, settled(), store.forgotten())
    assert len(store.files()) == 1 and len(rows_of(store)) == len(rows)


def test_a_file_merged_away_by_another_archiver_meanwhile_is_skipped(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    small_files(store, 1, 3)
    [path] = store.files()
    assert store.remove(path) and not store.remove(path)
    assert maintenance._read(store, path) is None
