"""`archive_lookup`, `archive_replay` and `archive_small_files`: the flight recorder's
reads at scale.

`archive_lookup`: 10,000,000 synthetic archived events over 30 days of partitions, written
once into bench-results/archive-cache/ and kept (a marker says the set is whole); then
lookups by messageId and by userId through `relay.archive.search`, p95 over a sample of
each. The layout is that of days the archiver's consolidation has merged
(relay.archive.maintenance): FILES_PER_DAY files a day of about 2.8 MB each, between
FULL_BYTES and MERGE_BYTES, as consolidation leaves a day of these 333,333 events (the
archiver itself writes a file per flush, thousands a day; `archive_small_files` measures
a day of those before and after consolidation).

`archive_replay`: a slice of 100,000 archived events queued on the replay lane by
`relay.archive.replay` (no worker: the figure is the time to queue them).

`archive_small_files`: one day of the same events (EVENTS / DAYS) as SMALL_FILES files,
as the archiver writes them; lookups over that day, the day's consolidation
(`maintenance.consolidate_day`), and the same lookups over what it leaves.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from relay.archive.store import ROW_GROUP
from tests.bench import harness
from tests.bench.e2e import _percentile
from tests.bench.harness import Env, say

EVENTS = 10_000_000
DAYS = 30
FILES_PER_DAY = 8  # what consolidation leaves of a day of EVENTS / DAYS of these events
SMALL_FILES = 1_000
SMALL_LOOKUPS = 10
USERS = 200_000
LOOKUPS = 40
LOOKUP_TARGET_S = 1.0
REPLAY_EVENTS = 100_000
REPLAY_TARGET_S = 10.0
CACHE = harness.RESULTS / "archive-cache"
_MARK = f"{EVENTS}-{DAYS}-{FILES_PER_DAY}-{USERS}-{ROW_GROUP}"
START = 1_794_182_400.0  # 2026-11-09T00:00:00Z: the first day of the set


def _user(i: int) -> str:
    return f"user-{(i * 7919) % USERS}"


def ensure_archive(root: Path = CACHE) -> Path:
    """The synthetic archive under `root`, written unless a whole one is there."""
    from pyarrow import fs as pafs

    from relay.archive import schema
    from relay.archive.store import Store

    marker = root / "COMPLETE"
    if marker.exists() and marker.read_text() == _MARK:
        return root
    shutil.rmtree(root, ignore_errors=True)
    store = Store(pafs.LocalFileSystem(), str(root.resolve()))
    user_keys = [schema.key_of(f"user-{u}") for u in range(USERS)]
    per_file = EVENTS // (DAYS * FILES_PER_DAY)
    began = time.monotonic()
    for part in range(DAYS * FILES_PER_DAY):
        span = 86400 / FILES_PER_DAY
        table = _table(part * per_file, per_file, START + part * span, span, user_keys)
        store.write(table, f"bench{part % FILES_PER_DAY}")
        if part % 20 == 19:
            written = (part + 1) * per_file
            say(f"  archive: {written:,} events written ({time.monotonic() - began:.0f} s)")
    marker.write_text(_MARK)
    return root


def _table(first: int, n: int, at0: float, span: float, user_keys: list[int]) -> pa.Table:
    """Synthetic archived tracks `first` to `first + n`, settled evenly over `span`
    seconds from `at0`, sorted as the archive's files are."""
    from relay.archive import schema

    ids = range(first, first + n)
    users = [(i * 7919) % USERS for i in ids]
    table = pa.table(
        {
            "settled_at": pa.array(
                [round((at0 + (i - first) * span / n) * 1000) for i in ids], pa.int64()
            ).cast(schema.TIME),
            "received_at": pa.array(
                [round((at0 + (i - first) * span / n - 0.2) * 1000) for i in ids],
                pa.int64(),
            ).cast(schema.TIME),
            "relay_id": [f"{i:032x}" for i in ids],
            "outcome": ["delivered" if i % 10 else "skipped" for i in ids],
            "type": ["track"] * n,
            "message_id": [f"msg-{i}" for i in ids],
            "user_id": [f"user-{u}" for u in users],
            "anonymous_id": [None] * n,
            "account_id": [f"acct-{u % 5000}" for u in users],
            "event": [("Login", "Viewed Page", "Exported Report")[i % 3] for i in ids],
            "reason": [None if i % 10 else "unknown_event" for i in ids],
            "attempts": pa.array([0] * n, pa.int32()),
            "source": ["api"] * n,
            "lane": ["live"] * n,
            "commands": [
                f'[{{"action":"trackEvent","accountExternalId":"acct-{u % 5000}",'
                f'"contactExternalId":"user-{u}","eventName":"Login"}}]'
                for u in users
            ],
            "tries": [f'[{{"at":{at0:.0f},"status":200,"error":null}}]'] * n,
            "body": [
                f'{{"type":"track","event":"Login","userId":"user-{u}","messageId":"msg-{i}",'
                f'"properties":{{"plan":"pro"}},"timestamp":"2026-11-20T10:00:00Z"}}'
                for u, i in zip(users, ids, strict=True)
            ],
            "message_key": pa.array([schema.key_of(f"msg-{i}") for i in ids], pa.int64()),
            "user_key": pa.array([user_keys[u] for u in users], pa.int64()),
            "anonymous_key": pa.array([0] * n, pa.int64()),
        }
    )
    return table.cast(schema.SCHEMA).sort_by(schema.SORTING)


def archive_lookup(env: Env) -> dict[str, Any]:
    """p95 of lookups by messageId and by userId over 10 M archived events, 30 days."""
    from pyarrow import fs as pafs

    from relay.archive import search
    from relay.archive.store import Store

    began = time.monotonic()
    root = ensure_archive()
    written_s = time.monotonic() - began
    store = Store(pafs.LocalFileSystem(), str(root.resolve()))
    disk = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    rng = random.Random(24)
    per_file = EVENTS // (DAYS * FILES_PER_DAY)
    total = per_file * DAYS * FILES_PER_DAY
    timings: dict[str, list[float]] = {"message_id": [], "user_id": []}
    found: dict[str, int] = {"message_id": 0, "user_id": 0}
    for _ in range(LOOKUPS):
        i = rng.randrange(total)
        for name, value in (("message_id", f"msg-{i}"), ("user_id", _user(i))):
            query = search.Query(**{name: value})
            t = time.perf_counter()
            hits = search.search(store, None, query, limit=50)
            timings[name].append(time.perf_counter() - t)
            found[name] += bool(hits)
    p95 = {name: _percentile([t * 1000 for t in ts], 95) for name, ts in timings.items()}
    worst = max(p95.values())
    return {
        "name": "archive_lookup",
        "events_per_s": None,
        "baseline_per_s": None,
        "ratio": None,
        "p99_ms": None,
        "archived_events": total,
        "days": DAYS,
        "files": len(store.files()),
        "bytes_on_disk": disk,
        "bytes_per_event": round(disk / total, 1),
        "written_s": round(written_s, 1),
        "lookups_each": LOOKUPS,
        "found": found,
        "p50_ms": {
            n: round(_percentile([t * 1000 for t in ts], 50), 1) for n, ts in timings.items()
        },
        "p95_ms": {n: round(v, 1) for n, v in p95.items()},
        "target": f"p95 <= {LOOKUP_TARGET_S * 1000:.0f} ms (messageId and userId)",
        "met": worst <= LOOKUP_TARGET_S * 1000 and all(v == LOOKUPS for v in found.values()),
    }


def archive_replay(env: Env) -> dict[str, Any]:
    """Seconds to queue a replay slice of 100,000 archived events."""
    from pyarrow import fs as pafs

    from relay.archive import replay
    from relay.archive.store import Store
    from relay.settings import Settings
    from relay.state import broker

    root = ensure_archive()
    store = Store(pafs.LocalFileSystem(), str(root.resolve()))
    # The events per second the set was written with (whole files: EVENTS rounded down).
    per_second = EVENTS // (DAYS * FILES_PER_DAY) * FILES_PER_DAY / 86400
    # A slice of the first day's morning holding REPLAY_EVENTS events.
    since = START + 3600
    until = since + REPLAY_EVENTS / per_second - 0.001
    with harness.bench_context(env, "archive_replay"):
        r = env.redis()
        try:
            settings = Settings(redis_url=env.redis_url)
            queue = broker.Queue(r, settings.message_events)
            began = time.monotonic()
            job = replay.Replay.of(r, {"since": str(since), "until": str(until)})
            done = 0
            for step in job.run(r, store, queue, settings.churnzero_batch_size):
                done = step.done
            seconds = time.monotonic() - began
            queued = int(r.get("relay:depth:ready") or 0)
        finally:
            r.close()
    return {
        "name": "archive_replay",
        "events_per_s": round(done / seconds),
        "baseline_per_s": None,
        "ratio": None,
        "p99_ms": None,
        "replayed": done,
        "queued_events_counted": queued,
        "seconds": round(seconds, 2),
        "target": f"{REPLAY_EVENTS:,} events queued in <= {REPLAY_TARGET_S:.0f} s",
        "met": done == REPLAY_EVENTS and seconds <= REPLAY_TARGET_S,
    }


def archive_small_files(env: Env) -> dict[str, Any]:
    """Lookups over one day of SMALL_FILES files, then over the files consolidation
    makes of them."""
    from pyarrow import fs as pafs

    from relay.archive import maintenance, schema, search
    from relay.archive.store import Store

    root = harness.RESULTS / "archive-small"
    shutil.rmtree(root, ignore_errors=True)
    store = Store(pafs.LocalFileSystem(), str(root.resolve()))
    user_keys = [schema.key_of(f"user-{u}") for u in range(USERS)]
    per_file = EVENTS // DAYS // SMALL_FILES
    span = 86400 / SMALL_FILES
    for part in range(SMALL_FILES):
        table = _table(part * per_file, per_file, START + part * span, span, user_keys)
        store.write(table, "a", name=f"s{round((START + part * span) * 1000)}-0")
    total = per_file * SMALL_FILES
    rng = random.Random(25)
    sample = [rng.randrange(total) for _ in range(SMALL_LOOKUPS)]

    def lookups() -> dict[str, float]:
        timings: dict[str, list[float]] = {"message_id": [], "user_id": []}
        for i in sample:
            for name, value in (("message_id", f"msg-{i}"), ("user_id", _user(i))):
                t = time.perf_counter()
                hits = search.search(store, None, search.Query(**{name: value}), limit=50)
                timings[name].append(time.perf_counter() - t)
                assert hits, (name, value)
        return {n: round(_percentile([t * 1000 for t in ts], 50), 1) for n, ts in timings.items()}

    try:
        small = lookups()
        files_before = len(store.files())
        began = time.monotonic()
        [day] = store.days()
        later = time.time() + maintenance.SETTLE_S + 1
        done = maintenance.consolidate_day(store, day, later, store.forgotten())
        consolidate_s = time.monotonic() - began
        files_after = len(store.files())
        merged = lookups()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "name": "archive_small_files",
        "events_per_s": None,
        "baseline_per_s": None,
        "ratio": None,
        "p99_ms": None,
        "events": total,
        "files_before": files_before,
        "files_after": files_after,
        "rows_dropped": done["rows_dropped"],
        "consolidate_s": round(consolidate_s, 1),
        "lookups_each": SMALL_LOOKUPS,
        "p50_ms_small_files": small,
        "p50_ms_consolidated": merged,
        "target": f"consolidation leaves <= {2 * FILES_PER_DAY} files of the day",
        "met": files_after <= 2 * FILES_PER_DAY and done["rows_dropped"] == 0,
    }
