"""The archive's columns and its files on a local disk (the bucket: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relay.archive import schema
from relay.archive.store import open_store
from relay.settings import Settings

DAY = 1_796_688_000.0  # 2026-12-08T00:00:00Z


def record(i: int, at: float) -> dict[str, object]:
    return {
        "settled_at": at, "received_at": at - 1, "relay_id": f"r{i}", "outcome": "delivered",
        "type": "track", "message_id": f"m{i}", "user_id": f"u{i % 3}", "event": "Login",
    }  # fmt: skip


def test_keys_are_stable_and_zero_only_for_no_id() -> None:
    assert schema.key_of(None) == schema.key_of("") == 0
    assert schema.key_of("ann") == schema.key_of("ann") != schema.key_of("bob")
    assert schema.key_of("ann") == -6488803333072012659  # pinned: files outlive processes


def test_a_write_splits_by_day_and_reads_back(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    rows = [record(i, DAY - 10 + i * 5) for i in range(4)]  # two before midnight, two after
    paths = store.write(schema.to_table(rows), "w1")
    assert store.days() == ["2026-12-07", "2026-12-08"]
    assert len(paths) == 2 and sorted(store.files()) == sorted(paths)
    assert store.files(since="2026-12-08") == [p for p in paths if "2026-12-08" in p]
    table = pq.read_table(store.files(since="2026-12-08")[0])
    assert table.schema.equals(schema.SCHEMA)
    assert sorted(table["relay_id"].to_pylist()) == ["r2", "r3"]
    assert set(table["user_key"].to_pylist()) == {schema.key_of("u2"), schema.key_of("u0")}
    assert not list(Path(tmp_path).rglob("*.tmp"))
    store.drop_day("2026-12-07")
    assert store.days() == ["2026-12-08"]


def test_forgotten_users_are_kept_beside_the_days(tmp_path: Path) -> None:
    store = open_store(Settings(archive_dir=tmp_path))
    assert store.forgotten().num_rows == 0
    row = {
        "user_key": [schema.key_of("ann")],
        "user_id": ["ann"],
        "forgotten_at": [int(DAY * 1000)],
    }
    store.forget(pa.Table.from_pydict(row, schema=schema.FORGOTTEN), "w1")
    assert store.forgotten()["user_id"].to_pylist() == ["ann"]
    assert store.days() == []


def test_the_default_place_is_under_the_state_dir(tmp_path: Path) -> None:
    assert open_store(Settings(state_dir=tmp_path)).root == str(tmp_path / "archive")
