"""The flight recorder's records: what a settlement writes (relay.state.archive), the
tries an envelope carries, and the archiver's pure parts (deletes, hiding, retention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from relay.archive import archiver, maintenance
from relay.archive.schema import key_of, to_table
from relay.archive.store import Store
from relay.commands import TrackEvent
from relay.envelope import TRIES_KEPT, Envelope
from relay.errors import DecodeError
from relay.reasons import Reason
from relay.state import archive, deadletter

pa = pytest.importorskip("pyarrow")
pafs = pytest.importorskip("pyarrow.fs")


def envelope(**event: Any) -> Envelope:
    body = {"type": "track", "userId": "ann", "event": "Clicked", "messageId": "m1", **event}
    return Envelope.new(body, source="api", received_at=100.0, rid="r1")


def test_a_failed_try_is_carried_the_newest_ten_and_read_back() -> None:
    item = envelope()
    assert item.tries is None and "tries" not in item.to_dict()
    for n in range(TRIES_KEPT + 2):
        item = item.attempted(200.0 + n, 503 if n % 2 else None, None if n % 2 else "timeout")
    assert item.attempts == TRIES_KEPT + 2 and item.tries is not None
    assert len(item.tries) == TRIES_KEPT
    assert item.tries[-1] == {"at": 211.0, "status": 503, "error": None}
    assert item.tries[0]["at"] == 202.0
    again = Envelope.from_json(item.to_json())
    assert again == item
    assert item.replayed("e1", 300.0).tries is None


def test_tries_that_are_not_a_list_of_objects_name_the_field() -> None:
    with pytest.raises(DecodeError, match="tries"):
        Envelope.from_dict({**envelope().to_dict(), "tries": "503"})


def test_a_settlement_records_each_event_with_its_outcome_commands_and_reason() -> None:
    sent = envelope().attempted(150.0, 503)
    command = TrackEvent(account="A", contact="C", event_name="Clicked", event_date="d")
    skipped = envelope(messageId="m2", event="Off")
    dead_item = envelope(messageId="m3").attempted(160.0, 400).to_dict()
    dead = deadletter.new_entry(dead_item, Reason.REJECTED, now=170.0, status=400)
    records = archive.settled_records(
        170.0, delivered=[(sent, [command])], skipped=[(skipped, "duplicate")], dead=[dead],
        sent={"r1": [command]},
    )  # fmt: skip
    assert [(r["outcome"], r["reason"]) for r in records] == [
        ("delivered", None), ("skipped", "duplicate"), ("dead", "rejected"),
    ]  # fmt: skip
    delivered = records[0]
    assert delivered["account_id"] == "A" and delivered["user_id"] == "ann"
    assert delivered["tries"] == [{"at": 150.0, "status": 503, "error": None}]
    assert records[2]["commands"] == [command.to_dict()] and records[2]["attempts"] == 1
    # As the stream holds them, and as the archiver and search read them back.
    pipe = Recorder()
    archive.stage_records(pipe, records)
    [(_key, fields)] = pipe.calls
    decoded = archive.decode(fields)
    assert (
        isinstance(decoded[0]["body"], str)
        and orjson.loads(decoded[0]["body"])["messageId"] == "m1"
    )
    assert orjson.loads(decoded[0]["commands"]) == [command.to_dict()]
    table = to_table(decoded)
    assert table.num_rows == 3 and set(table["user_key"].to_pylist()) == {key_of("ann")}
    # A worker's entry (a row per event, each event's JSON written once) reads the same.
    compact = Recorder()
    archive.stage_settled(
        compact, 170.0, delivered=[(sent, [command])], skipped=[(skipped, "duplicate")],
        dead=[dead], sent={"r1": [command]},
    )  # fmt: skip
    [(_key, fields)] = compact.calls
    assert set(fields) == {b"m", b"b", b"c"}
    assert archive.decode(fields) == decoded
    assert archive.columns(fields)["outcome"] == ["delivered", "skipped", "dead"]


class Recorder:
    """A pipeline that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[bytes, bytes]]] = []

    def xadd(self, key: str, fields: dict[bytes, bytes]) -> None:
        self.calls.append((key, fields))


def record(user: str | None, at: float, **extra: Any) -> dict[str, Any]:
    return {"settled_at": at, "received_at": at, "relay_id": f"r{at}", "outcome": "delivered",
            "type": "track", "user_id": user, **extra}  # fmt: skip


def test_an_honoured_delete_forgets_its_user_and_hides_what_came_before_it() -> None:
    delete = record("gone", 50.0, type="delete", outcome="skipped", reason="delete_request")
    refused = record("kept", 50.0, type="delete", outcome="skipped", reason="delete_refused")
    names = ("type", "reason", "user_id", "anonymous_id", "received_at", "settled_at")
    forgotten = archiver.forgotten_users(
        {name: [r.get(name) for r in (delete, refused)] for name in names}
    )
    assert forgotten == {"gone": 50.0}
    rows = [record("gone", 10.0), delete, record("gone", 60.0), record("kept", 10.0),
            record(None, 10.0, anonymous_id="gone")]  # fmt: skip
    hidden = maintenance.hidden(
        to_table(rows).sort_by("relay_id"), archiver.forgotten_table(forgotten)
    )
    ordered = sorted(rows, key=lambda r: r["relay_id"])
    flags = hidden.to_pylist()
    shown = [(r["user_id"], r["settled_at"]) for r, h in zip(ordered, flags, strict=True) if not h]
    assert sorted(shown, key=str) == sorted([("gone", 60.0), ("kept", 10.0)], key=str)


def test_retention_and_compaction_on_a_directory(tmp_path: Path) -> None:
    store = Store(pafs.LocalFileSystem(), str(tmp_path))
    day = 86400.0
    now = 100 * day
    store.write(to_table([record("ann", now - 40 * day), record("gone", now - 2 * day)]), "t")
    store.write(to_table([record("gone", now - 1 * day), record("ann", now - 1 * day)]), "t")
    oldest, *_ = days = store.days()
    assert len(days) == 3
    assert maintenance.retain(store, 30, now) == [oldest]
    assert len(store.days()) == 2
    assert maintenance.compact(store) == {"files": 0, "rows_removed": 0}
    store.forget(archiver.forgotten_table({"gone": now}), "t")
    assert maintenance.compact(store) == {"files": 2, "rows_removed": 2}
    import pyarrow.parquet as pq

    users = [u for p in store.files() for u in pq.read_table(p)["user_id"].to_pylist()]
    assert users == ["ann"]
    assert len(store.files()) == 1  # a file left with no row is removed


def test_writing_the_same_name_again_replaces_the_file(tmp_path: Path) -> None:
    store = Store(pafs.LocalFileSystem(), str(tmp_path))
    store.write(to_table([record("ann", 10.0)]), "a", name="s1-0")
    store.write(to_table([record("ann", 10.0), record("bob", 11.0)]), "b", name="s1-0")
    [path] = store.files()
    import pyarrow.parquet as pq

    assert pq.read_table(path).num_rows == 2
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_child_that_is_not_essential_is_started_again_never_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import sys
    import time

    from relay.ops import keeper

    monkeypatch.setattr(keeper, "EARLY_DEATH_S", 0.05)
    said: list[str] = []
    dies = keeper.Child("archiver", [sys.executable, "-S", "-c", "pass"], essential=False)
    supervisor = keeper.Supervisor([dies], dict(os.environ), said.append)
    supervisor._start(0)
    deadline = time.monotonic() + 10
    try:
        # More early deaths than make the supervisor give up on an essential child.
        while len(said) <= keeper.MAX_EARLY_DEATHS and time.monotonic() < deadline:
            assert supervisor._check()
            time.sleep(0.01)
    finally:
        supervisor._stop_all()
    assert len(said) > keeper.MAX_EARLY_DEATHS
    assert all("archiver process" in line and "starting another" in line for line in said)


def test_the_delivery_and_ingest_processes_never_import_the_archive_engines() -> None:
    """pyarrow and duckdb cost a process tens of MB: only the archive's own modules (run in
    the archiver, or by the operator's commands) import them."""
    import re

    root = Path(__file__).resolve().parents[2]
    heavy = re.compile(r"^\s*(?:import|from)\s+(pyarrow|duckdb|relay\.archive)\b", re.MULTILINE)
    found = []
    for folder in ("relay", "workers"):
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(("relay/archive/", "relay/ops/")):
                found += [f"{rel}: {m}" for m in heavy.findall(path.read_text())]
    assert not found


def test_the_archiver_process_imports_neither_the_queue_nor_the_cli() -> None:
    """The archiver runs beside the delivery processes on every worker host: its entry
    point leaves out Celery and kombu (the queue), click and rich (the CLI)."""
    import subprocess
    import sys

    probe = (
        "import sys, relay.archive.__main__ as m; "
        "print(' '.join(sorted(n for n, mod in sys.modules.items() if mod is not None)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = {name.split(".")[0] for name in out.stdout.split()}
    assert "pyarrow" in loaded and "relay" in loaded  # the probe imported the archiver
    assert not loaded & {"celery", "kombu", "click", "rich", "duckdb"}
