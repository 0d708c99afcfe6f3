"""The flight recorder with real processes: events sent through ingest and a worker end
up in the archive's day partitions (a directory, or a bucket of an S3-compatible server
the test starts: moto's `moto_server`), once; retention drops old days; a delete hides
the user at once and compaction removes the rows; `relay worker` runs the archiver and
starts it again when it dies, while delivery goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests

from tests import procs
from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    Starter,
    relay_env,
    settled,
    url_of,
    wait_for,
)
from tests.procs import Proc, free_port

pytestmark = pytest.mark.integration
pa = pytest.importorskip("pyarrow")
pafs = pytest.importorskip("pyarrow.fs")
pq = pytest.importorskip("pyarrow.parquet")

AUTH = (WRITE_KEY, "")
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# The archiver writes often: a test waits for the files, not for the default's seconds.
FAST = {"archive": True, "archive_flush_s": 0.3}


@dataclass
class Where:
    """An archive's settings for relay processes, and its store as the test reads it."""

    settings: dict[str, Any]
    env: dict[str, str]

    def store(self) -> Any:
        from relay.archive.store import open_store
        from relay.settings import Settings

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return open_store(Settings(**self.settings))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def rows(self) -> list[dict[str, Any]]:
        """Every archived row."""
        store = self.store()
        tables = [pq.read_table(p, filesystem=store.fs) for p in store.files()]
        return pa.concat_tables(tables).to_pylist() if tables else []


def moto(tmp_path: Path) -> Iterator[Where]:
    """An S3-compatible server process (moto_server) on a free port, with a bucket."""
    port = free_port()
    binary = Path(sys.executable).parent / "moto_server"
    server = Proc([str(binary), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ),
                  tmp_path / "moto.log").start()  # fmt: skip
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/", server)
        fs = pafs.S3FileSystem(
            access_key="testing", secret_key="testing", region="us-east-1",
            endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
        )  # fmt: skip
        fs.create_dir("archive-test")
        url = f"s3://archive-test/relay?endpoint_override=127.0.0.1:{port}&scheme=http"
        yield Where({"archive_url": url}, dict(S3_KEYS))
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Where]:
    """The archive in a directory, or in a bucket of a moto_server the test starts."""
    if request.param == "local":
        yield Where({"archive_dir": str(tmp_path / "archive")}, {})
    else:
        yield from moto(tmp_path)


@pytest.fixture
def local(tmp_path: Path) -> Where:
    return Where({"archive_dir": str(tmp_path / "archive")}, {})


@pytest.fixture
def start_archiver(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start archiver processes, as `relay worker` does (stopped after the test)."""
    children = procs.Children(tmp_path, prefix="archiver")

    def start(where: Where, **settings: Any) -> Proc:
        env = {**relay_env(redis_url, **{**FAST, **where.settings, **settings}), **where.env}
        args = [sys.executable, "-m", "relay.archive"]  # what `relay worker` starts
        return children.start(f"archiver{len(children.procs)}", args, env)

    yield start
    children.stop_all()


def post(url: str, path: str, body: dict[str, Any]) -> None:
    requests.post(url + path, auth=AUTH, json=body, timeout=10).raise_for_status()


def by_message(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["message_id"], []).append(row)
    return out


def archived(r: redis.Redis) -> int:
    return int(r.hget("relay:stats", "archived") or 0)


def drained(r: redis.Redis) -> bool:
    """Settled, and every record written to the files."""
    return settled(r) and r.xlen("relay:archive") == 0


def test_settled_events_land_in_their_day_partition_with_outcome_commands_and_tries(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, start_archiver: Callable[..., Proc], where: Where,
) -> None:  # fmt: skip
    url = start_ingest(**FAST)
    start_worker(**FAST)
    archiver = start_archiver(where)
    ids = {"accountExternalId": "A", "contactExternalId": "C"}
    post(url, "/v1/identify", {"userId": "ann", "messageId": "m-identify", "traits": ids})
    post(url, "/v1/track", {"userId": "ann", "event": "Clicked", "messageId": "m-track"})
    wait_for(lambda: len(clean_sandbox.commands()) >= 1)
    post(url, "/v1/track", {"userId": "ann", "event": "Clicked", "messageId": "m-track"})
    post(url, "/v1/track", {"userId": "ann", "event": "Off", "messageId": "m-off",
                            "integrations": {"ChurnZero": False}})  # fmt: skip
    # A try answered 503, then a 2xx: the try is part of the record.
    clean_sandbox.fault(status=503)
    post(url, "/v1/track", {"userId": "ann", "event": "Retried", "messageId": "m-retried"})
    wait_for(lambda: clean_sandbox.answered(503))
    clean_sandbox.clear_faults()
    wait_for(lambda: "Retried" in {c.get("eventName") for c in clean_sandbox.commands()})
    # ChurnZero refuses it for good: dead-lettered, its commands and its try recorded.
    clean_sandbox.fault(status=400)
    post(url, "/v1/track", {"userId": "ann", "event": "Refused", "messageId": "m-refused"})
    wait_for(lambda: r.hlen("relay:dlq:entries") == 1)
    clean_sandbox.clear_faults()
    wait_for(lambda: drained(r) and archived(r) >= 6, timeout=60)
    archiver.check_alive()

    rows = by_message(where.rows())
    assert {k: len(v) for k, v in rows.items()} == {
        "m-identify": 1, "m-track": 2, "m-off": 1, "m-retried": 1, "m-refused": 1,
    }  # fmt: skip
    [identify] = rows["m-identify"]
    assert (identify["outcome"], identify["reason"]) == ("skipped", "nothing_to_send")
    outcomes = sorted((row["outcome"], row["reason"]) for row in rows["m-track"])
    assert outcomes == [("delivered", None), ("skipped", "duplicate")]
    track = next(row for row in rows["m-track"] if row["outcome"] == "delivered")
    import json

    assert [c["eventName"] for c in json.loads(track["commands"])] == ["Clicked"]
    assert track["user_id"] == "ann" and track["account_id"] == "A"
    assert track["type"] == "track" and track["event"] == "Clicked" and track["lane"] == "live"
    assert json.loads(track["body"])["messageId"] == "m-track"
    assert track["settled_at"].date() == track["received_at"].date()
    [off] = rows["m-off"]
    assert (off["outcome"], off["reason"], off["commands"]) == (
        "skipped",
        "disabled_by_integrations",
        None,
    )
    [retried] = rows["m-retried"]
    assert retried["outcome"] == "delivered" and retried["attempts"] >= 1
    assert [t["status"] for t in json.loads(retried["tries"])][:1] == [503]
    [refused] = rows["m-refused"]
    assert (refused["outcome"], refused["reason"]) == ("dead", "rejected")
    assert [t["status"] for t in json.loads(refused["tries"])][-1] == 400
    assert [c["eventName"] for c in json.loads(refused["commands"])] == ["Refused"]
    from relay.archive.schema import key_of

    assert track["user_key"] == key_of("ann") and track["message_key"] == key_of("m-track")
    # Partitioned by the day of settlement, as `day=YYYY-MM-DD/`.
    store = where.store()
    assert store.days() == [track["settled_at"].strftime("%Y-%m-%d")]


def test_retention_drops_the_days_older_than_archive_days(
    r: redis.Redis, start_archiver: Callable[..., Proc], local: Where
) -> None:
    from relay.archive.schema import to_table

    store = local.store()
    now = time.time()

    def record(days_ago: int) -> dict[str, Any]:
        at = now - days_ago * 86400
        return {"settled_at": at, "received_at": at, "relay_id": f"r{days_ago}",
                "outcome": "delivered", "type": "track", "user_id": "ann"}  # fmt: skip

    store.write(to_table([record(40), record(31), record(29), record(1)]), "test")
    assert len(store.days()) == 4
    # At its start the archiver keeps the last `archive_days` days, whole.
    start_archiver(local, archive_days=30)
    wait_for(lambda: len(store.days()) == 2)
    assert {row["relay_id"] for row in local.rows()} == {"r29", "r1"}
    # So does `relay archive compact`, on demand.
    env = {**relay_env(url_of(r), **local.settings), **local.env}
    out = subprocess.run([sys.executable, "-m", "relay.ops.cli", "archive", "compact"],
                         env={**env, "RELAY_ARCHIVE_DAYS": "2"}, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    assert '"days_dropped": ["' in out.stdout
    assert {row["relay_id"] for row in local.rows()} == {"r1"}


def test_a_delete_hides_the_user_at_once_and_compaction_removes_the_rows(
    r: redis.Redis, redis_url: str, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, start_archiver: Callable[..., Proc], local: Where,
) -> None:  # fmt: skip
    from relay.archive import maintenance as archiving

    url = start_ingest(**FAST)
    start_worker(**FAST)
    start_archiver(local)
    for user in ("gone", "kept"):
        traits = {"accountExternalId": "A", "contactExternalId": user}
        post(url, "/v1/identify", {"userId": user, "messageId": f"{user}-id", "traits": traits})
        post(url, "/v1/track", {"userId": user, "event": "E", "messageId": f"{user}-t"})
    wait_for(lambda: drained(r) and archived(r) >= 4, timeout=60)
    env = relay_env(redis_url, **FAST, **local.settings)
    forget = [sys.executable, "-m", "relay.ops.cli", "identities", "forget", "gone", "--yes"]
    subprocess.run(forget, env=env, check=True, capture_output=True, timeout=60)
    store = local.store()
    wait_for(lambda: store.forgotten().num_rows == 1 and drained(r), timeout=60)

    # Hidden: every row of the user received up to the delete (the delete's own included).
    table = pa.concat_tables(pq.read_table(p) for p in store.files())
    mask = archiving.hidden(table, store.forgotten()).to_pylist()
    shown = {row["message_id"] for row, hide in zip(table.to_pylist(), mask, strict=True)
             if not hide}  # fmt: skip
    users = {row["user_id"] for row in table.to_pylist()}
    assert shown == {"kept-id", "kept-t"} and users == {"gone", "kept"}
    # Compaction rewrites the files without them.
    compact = [sys.executable, "-m", "relay.ops.cli", "archive", "compact"]
    out = subprocess.run(compact, env=env, check=True, capture_output=True, text=True, timeout=60)
    assert '"rows_removed": 3' in out.stdout, out.stdout
    assert {row["user_id"] for row in local.rows()} == {"kept"}
    # A user who comes back after the delete is archived again, and shown.
    post(url, "/v1/track", {"userId": "gone", "event": "E", "messageId": "gone-again"})
    wait_for(lambda: drained(r) and "gone-again" in by_message(local.rows()), timeout=60)
    table = pa.concat_tables(pq.read_table(p) for p in store.files())
    assert not any(archiving.hidden(table, store.forgotten()).to_pylist())


def test_relay_worker_runs_the_archiver_and_starts_it_again_while_delivery_goes_on(
    r: redis.Redis, redis_url: str, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    local: Where, tmp_path: Path,
) -> None:  # fmt: skip
    settings = {**FAST, **local.settings, "churnzero_url": clean_sandbox.url + "/i"}
    args = [sys.executable, "-m", "relay.ops.cli", "worker", "-n", f"arch-{os.getpid()}@%h"]
    proc = Proc(args, relay_env(redis_url, **settings), tmp_path / "worker.log").start()
    try:
        supervisor = psutil.Process(proc.pid)

        def archivers() -> list[psutil.Process]:
            return [c for c in supervisor.children() if "relay.archive" in c.cmdline()]

        # The live worker and the archiver (the replay lane's process starts on demand).
        wait_for(lambda: len(supervisor.children()) == 2 and len(archivers()) == 1, 60)
        # Delivery gets the CPU first: the archiver runs as nice as the replay lane.
        assert archivers()[0].nice() == supervisor.nice() + 10
        url = start_ingest(**FAST)
        ids = {"accountExternalId": "A", "contactExternalId": "C"}
        post(url, "/v1/identify", {"userId": "ann", "messageId": "before", "traits": ids})
        wait_for(lambda: drained(r) and archived(r) == 1, timeout=60)
        [first] = archivers()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # Delivery does not wait for it.
        post(url, "/v1/track", {"userId": "ann", "event": "E", "messageId": "during"})
        wait_for(lambda: len(clean_sandbox.commands()) >= 1, timeout=60)
        wait_for(lambda: len(archivers()) == 1 and archivers()[0].pid != first.pid, 60)
        wait_for(lambda: drained(r) and archived(r) == 2, timeout=60)
        assert set(by_message(local.rows())) == {"before", "during"}
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(60) == 0
    finally:
        proc.stop(signal.SIGKILL)


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_worker_and_archiver_sigkilled_mid_write_under_load_lose_no_record(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, start_archiver: Callable[..., Proc], local: Where,
) -> None:  # fmt: skip
    from tests.integration.test_chaos import SHORT_LEASE, Load, delivered, identify, record

    clean_sandbox.fault(latency_ms=20)
    url = start_ingest(**FAST)
    identify(url)
    worker = start_worker(**FAST, **SHORT_LEASE)
    archiver = start_archiver(local, archive_flush_s=1)
    load = Load([url], 20_000).start()
    # The archiver is killed while it writes a file: its temporary file is on disk.
    folder = Path(local.settings["archive_dir"])
    wait_for(lambda: archived(r) > 2_000, timeout=90)
    deadline = time.monotonic() + 30
    while not any(folder.rglob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    mid_write = any(folder.rglob("*.tmp"))
    archiver.stop(signal.SIGKILL)
    wait_for(lambda: len(clean_sandbox.commands()) > 8_000, timeout=90)
    worker.stop(signal.SIGKILL)
    load.join()
    start_worker(**FAST, **SHORT_LEASE)
    start_archiver(local, archive_flush_s=1)
    wait_for(lambda: drained(r) and load.acked <= set(delivered(clean_sandbox)), timeout=200)
    # The dead archiver's entries are taken over once idle: the stream empties.
    wait_for(lambda: r.xlen("relay:archive") == 0, timeout=60)

    rows = [(row["message_id"], row["relay_id"], row["outcome"], row["settled_at"])
            for row in pa.concat_tables(pq.read_table(p) for p in local.store().files())
            .select(["message_id", "relay_id", "outcome", "settled_at"]).to_pylist()
            for row in [row]]  # fmt: skip
    copies = Counter((relay_id, outcome, at) for _, relay_id, outcome, at in rows)
    found = {message_id for message_id, *_ in rows}
    figures = record(
        "worker and archiver SIGKILLed mid-write (archive)", load, delivered(clean_sandbox), r,
        duplicate_bound=4 * 500, archived_rows=len(rows),
        archive_missing=len(load.acked - found),
        archive_copies=sum(n - 1 for n in copies.values()), archiver_killed_mid_write=mid_write,
    )  # fmt: skip
    assert figures["archive_missing"] == 0, figures
    # A record is written again only under the name it had: it replaces, never adds.
    assert figures["archive_copies"] == 0, figures
    assert r.xpending("relay:archive", "archivers")["pending"] == 0


def test_consolidation_merges_a_days_small_files_one_archiver_at_a_time(
    r: redis.Redis, where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay import keys
    from relay.archive import maintenance
    from relay.archive.schema import to_table

    for name, value in where.env.items():  # the bucket's keys, as an archiver has them
        monkeypatch.setenv(name, value)
    store = where.store()
    noon = (time.time() // 86400 - 1) * 86400 + 43200  # yesterday, 12:00 UTC
    rows = [{"settled_at": noon + i, "received_at": noon + i, "relay_id": f"r{i}",
             "outcome": "delivered", "type": "track", "user_id": f"u{i % 3}"}
            for i in range(60)]  # fmt: skip
    for n in range(6):  # as the archiver names them: after a stream entry
        store.write(to_table(rows[n * 10 : (n + 1) * 10]), "a", name=f"s{noon:.0f}{n:03}-0")
    [day] = store.days()
    lock = keys.ARCHIVE_CONSOLIDATING + day
    later = time.time() + maintenance.SETTLE_S + 1
    # Another archiver merges the day: it is left to that one.
    r.set(lock, "another archiver's token", px=60_000)
    assert maintenance.consolidate(store, r, later)["files_merged"] == 0
    assert len(store.files()) == 6
    r.delete(lock)
    done = maintenance.consolidate(store, r, later)
    assert done == {"files_merged": 6, "files_written": 1, "rows_dropped": 0}
    assert len(store.files()) == 1 and not r.exists(lock)
    assert sorted(row["relay_id"] for row in where.rows()) == sorted(f"r{i}" for i in range(60))


def test_relay_archive_compact_merges_the_small_files_of_more_than_an_hour_ago(
    r: redis.Redis, local: Where
) -> None:
    from relay.archive.schema import to_table

    store = local.store()
    now = time.time()
    rows = [{"settled_at": now - 7200, "received_at": now - 7200, "relay_id": f"r{i}",
             "outcome": "delivered", "type": "track", "user_id": "ann"}
            for i in range(4)]  # fmt: skip
    for i, row in enumerate(rows):
        store.write(to_table([row]), "a", name=f"s{i}")
    for path in store.files():  # written two hours ago
        os.utime(path, (now - 7200, now - 7200))
    store.write(to_table([{**rows[0], "relay_id": "young"}]), "a", name="s9")
    env = {**relay_env(url_of(r), **local.settings), **local.env}
    out = subprocess.run([sys.executable, "-m", "relay.ops.cli", "archive", "compact"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(out.stdout)["files_merged"] == 4, out.stdout
    assert len(store.files()) == 2  # the merged file, and the one still young
    assert sorted(row["relay_id"] for row in local.rows()) == ["r0", "r1", "r2", "r3", "young"]
