"""`relay search`, `relay trace`'s fallback, `relay replay`, `/admin/api/search` and the
admin page's search box, over real archive files (a directory, and a bucket of an
S3-compatible server, moto_server, started here) and a real Redis."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner

from relay.archive import replay, schema
from relay.archive.store import Store, open_store
from relay.ops.cli import main
from relay.ops.cli_context import Deployment
from relay.settings import Settings
from relay.state import trace
from relay.state.broker import Queue
from tests.integration.conftest import (
    TOKEN,
    WRITE_KEY,
    Sandbox,
    Seen,
    Starter,
    free_port,
    log_in,
    queued_items,
    relay_env,
    settled,
    url_of,
    wait_for,
)
from tests.integration.test_archive_search import record, stage

pytestmark = pytest.mark.integration

NOW = time.time()  # the seed's clock: its windows are hours wide


def run(settings: Settings, *args: str) -> Any:
    result = CliRunner().invoke(main, list(args), obj=Deployment(settings))
    return result


@pytest.fixture
def settings(r: redis.Redis, tmp_path: Path) -> Settings:
    return Settings(redis_url=url_of(r), archive_dir=tmp_path / "archive", state_dir=tmp_path)


def seed(r: redis.Redis, store: Store) -> None:
    rows = [record(i, NOW - 3600 * i) for i in range(30)]
    rows[4] |= {"outcome": "dead", "reason": "retries_exhausted", "commands": None}
    store.write(schema.to_table(rows[5:]), "w1")
    stage(r, rows[:5])


def test_search_prints_a_table_and_json(r: redis.Redis, settings: Settings) -> None:
    seed(r, open_store(settings))
    shown = run(settings, "search", "--user", "u1", "--since", "10h", "--limit", "5")
    assert shown.exit_code == 0, shown.output
    assert "user u1" in shown.output and "trackEvent" in shown.output and "3 shown" in shown.output
    lines = run(settings, "search", "--message-id", "m4", "--json").output.splitlines()
    (hit,) = [json.loads(line) for line in lines]
    assert hit["outcome"] == "dead" and hit["reason"] == "retries_exhausted"
    assert hit["body"]["messageId"] == "m4" and hit["tries"][0]["status"] == 200
    # A host where no relay runs (it reads the bucket): the files alone, and it says so.
    files_only = Settings(archive_dir=settings.archive_dir, state_dir=settings.state_dir)
    alone = run(files_only, "search", "--message-id", "m20")
    assert alone.exit_code == 0 and "1 shown" in alone.output and "files only" in alone.output
    assert "0 shown" in run(files_only, "search", "--message-id", "m3").output  # in Redis
    bad = run(settings, "search", "--since", "yesterday")
    assert bad.exit_code == 1 and "'yesterday' is not a time" in bad.output
    assert "outcome is one of" in run(settings, "search", "--outcome", "lost").output


def test_trace_falls_back_to_the_archive(r: redis.Redis, settings: Settings) -> None:
    seed(r, open_store(settings))
    found = run(settings, "trace", "m20")  # in no queue and not in the trace ring
    assert found.exit_code == 0, found.output
    assert "delivered at" in found.output and "from the archive" in found.output
    assert "trackEvent" in found.output
    by_relay_id = run(settings, "trace", "ab" * 8 + "1f")  # settled long ago, by relay id
    assert by_relay_id.exit_code == 1  # no such relay id: the archive was asked, and said so
    store = open_store(settings)
    store.write(schema.to_table([record(7, NOW - 9e4, relay_id="ab" * 8 + "1f")]), "w2")
    found = run(settings, "trace", "ab" * 8 + "1f").output
    assert "delivered at" in found and f"relay id {'ab' * 8}1f" in found
    gone = run(settings, "trace", "m999")
    assert gone.exit_code == 1 and "nor in the archive" in gone.output


def test_replay_asks_shows_a_dry_run_and_continues(r: redis.Redis, settings: Settings) -> None:
    seed(r, open_store(settings))
    window = ["--since", "20000s", "--until", "now", "--user", "u0"]
    asked = run(settings, "replay", *window)
    assert asked.exit_code == 1 and "sends 2 archived events again" in asked.output
    dry = run(settings, "replay", *window, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "of 2 events" in dry.output and "would" in dry.output
    assert "(dry run: nothing was sent or changed)" in dry.output
    assert queued_items(r, "relay.replay") == []
    done = run(settings, "replay", *window, "--yes")
    assert done.exit_code == 0, done.output
    assert "2 of 2 replayed" in done.output
    assert sorted(i["event"]["messageId"] for i in queued_items(r, "relay.replay")) == ["m0", "m3"]
    again = run(settings, "replay", *window, "--yes")
    assert "all 2 events replayed already" in again.output
    assert len(queued_items(r, "relay.replay")) == 2


def test_admin_api_and_the_search_box(
    r: redis.Redis, settings: Settings, start_ingest: Callable[..., str], page: Any, seen: Seen
) -> None:
    from playwright.sync_api import expect

    seed(r, open_store(settings))
    url = start_ingest(admin_token=TOKEN, archive_dir=settings.archive_dir)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answer = requests.get(
        url + "/admin/api/search", params={"user": "u2", "limit": 3}, headers=auth
    )
    assert answer.status_code == 200
    assert [h["message_id"] for h in answer.json()["hits"]] == ["m2", "m5", "m8"]
    assert requests.get(url + "/admin/api/search", params={"user": "u2"}).status_code == 401
    bad = requests.get(url + "/admin/api/search", params={"since": "soon"}, headers=auth)
    assert bad.status_code == 400 and "not a time" in bad.json()["error"]
    traced = requests.get(url + "/admin/api/trace/m20", headers=auth).json()["found"]
    assert traced[0]["state"] == "delivered" and traced[0]["archived"] is True

    log_in(page, url, TOKEN)
    page.fill("#search-message_id", "m4")
    page.click("#search-submit")
    hit = page.locator(".search-hit")
    expect(hit).to_have_count(1)
    expect(hit).to_contain_text("dead (retries_exhausted)")
    expect(hit).to_contain_text('"messageId":"m4"')
    expect(hit).to_contain_text("try: ")
    page.fill("#search-message_id", "")
    page.fill("#search-user", "u1")
    page.fill("#search-since", "5h")
    page.click("#search-submit")
    expect(hit).to_have_count(2)
    expect(hit.first).to_contain_text("sent: ")
    assert seen.errors == []


@pytest.fixture
def bucket(tmp_path: Path) -> Iterator[str]:
    """An S3-compatible server (moto_server, a process) with a bucket; its archive URL."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except requests.RequestException:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               allow_bucket_creation=True, access_key="test",
                               secret_key="test", region="us-east-1")  # fmt: skip
        s3.create_dir("archive-test")
        yield f"s3://archive-test/relay?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_search_and_replay_read_a_bucket(
    r: redis.Redis, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = Settings(redis_url=url_of(r), archive_url=bucket)
    store = open_store(settings)
    assert not store.local
    seed(r, store)
    assert len(store.files()) >= 2  # the seed spans 29 hours: two or three UTC days
    lines = run(settings, "search", "--user", "u1", "--json").output.splitlines()
    assert [json.loads(x)["message_id"] for x in lines] == [f"m{i}" for i in range(1, 30, 3)]
    (old,) = [json.loads(x) for x in run(settings, "search", "--message-id", "m28", "--json")
              .output.splitlines()]  # fmt: skip
    assert old["commands"] == [{"action": "trackEvent", "n": 28}]
    done = run(settings, "replay", "--since", "30h", "--until", "now", "--event", "Login", "--yes")
    assert done.exit_code == 0, done.output
    assert len(queued_items(r, "relay.replay")) == 30


IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def test_a_replayed_slice_reaches_churnzero_once(
    r: redis.Redis, settings: Settings, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:  # fmt: skip
    """A slice replayed in two runs (the first interrupted) arrives once per event; an
    event delivered within the dedupe window is skipped as a duplicate, not sent again."""
    start_worker()
    url = start_ingest()
    live = {"type": "track", "userId": "u", "event": "Live", "messageId": "live-1",
            "properties": IDS}  # fmt: skip
    requests.post(url + "/v1/track", auth=(WRITE_KEY, ""), json=live).raise_for_status()
    clean_sandbox.wait_commands(1)
    wait_for(lambda: settled(r))
    (relay_id,) = [s.detail["relay_id"] for s in trace.find(r, "live-1")]
    rows, now = [], time.time()
    for i in range(12):
        event = {"type": "track", "userId": "u", "event": f"Old {i}", "messageId": f"old-{i}",
                 "properties": IDS, "timestamp": "2026-11-01T10:00:00Z"}  # fmt: skip
        rows.append(record(i, now - 600 + i, body=json.dumps(event), user_id="u"))
    rows.append(record(99, now - 100, body=json.dumps(live), relay_id=relay_id, user_id="u"))
    store = open_store(settings)
    store.write(schema.to_table(rows), "w1")
    filters = {"since": "20m", "until": "now", "user_id": "u"}
    job = replay.Replay.of(r, filters)
    steps = job.run(r, store, Queue(r, 100), 10, page_size=5)
    next(steps)
    steps.close()  # interrupted after one page
    assert job.done == 5
    done = run(settings, "replay", "--since", "20m", "--until", "now", "--user", "u", "--yes")
    assert done.exit_code == 0, done.output
    assert "13 of 13 replayed" in done.output
    wait_for(lambda: len(clean_sandbox.commands()) >= 13)
    wait_for(lambda: settled(r))
    names = [c["eventName"] for c in clean_sandbox.commands()]
    assert sorted(names) == sorted(["Live"] + [f"Old {i}" for i in range(12)])
    assert int(r.hget("relay:stats", "skipped:duplicate") or 0) == 1


def test_ctrl_c_says_what_is_left_and_the_same_command_continues(
    r: redis.Redis, settings: Settings, redis_url: str
) -> None:
    """Ctrl-C while a replay waits on Redis (writes paused, so the run is caught mid-way
    on any machine): it prints what was replayed and what is left; run again, it sends
    the rest, and every event is queued once."""
    events = 40_000
    now = time.time()  # not the module's NOW: the window is minutes, the suite longer
    rows = [record(i, now - 1000 + i * 0.02, user_id="u") for i in range(events)]
    open_store(settings).write(schema.to_table(rows), "w1")
    command = [sys.executable, "-m", "relay.ops.cli", "replay", "--since", "2000s", "--until",
               "now", "--yes"]  # fmt: skip
    env = relay_env(redis_url, archive_dir=settings.archive_dir, state_dir=settings.state_dir)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        state = "relay:archive:replay:" + replay.Replay.id_of({"since": "2000s", "until": "now"})
        deadline = time.monotonic() + 60
        # Polled tightly: the run's first page to its last is a fraction of a second.
        while not int(r.hget(state, "done") or 0) and proc.poll() is None:
            assert time.monotonic() < deadline, "the replay queued nothing in time"
        r.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 130, text
    done = int(r.hget(state, "done") or 0)
    assert f"interrupted: {done:,} of {events:,} replayed, {events - done:,} left" in text
    assert 0 < done < events
    again = subprocess.run(command, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
    assert f"{events:,} of {events:,} replayed" in again.stdout.decode()
    ids = [i["id"] for i in queued_items(r, "relay.replay")]
    assert len(ids) == len(set(ids)) == events
