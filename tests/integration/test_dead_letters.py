"""Dead letters written by the previous version, and the operator's selections of them.

`tests/fixtures/deadletter/entries.jsonl` holds two entries in the exact JSON the previous
version stored (a `rejected` one and an `invalid_event` one). They must still list, show,
replay and purge, and `relay dlq` selects them by reason and by time as a user types it.
The CLI runs in this process on a `Deployment` of the test database.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from relay import keys
from relay.ops.cli import main
from relay.ops.cli_context import Deployment
from relay.reasons import Reason
from relay.settings import Settings
from relay.state import deadletter
from tests.conftest import ROOT
from tests.integration.conftest import queued_items, url_of

pytestmark = pytest.mark.integration
LEGACY = ROOT / "tests" / "fixtures" / "deadletter" / "entries.jsonl"
REJECTED = "efc15a5187e042c3ab45e890793681ae"  # last failure 2024-06-10 06:13:20 UTC
INVALID = "3b9712f3d02c84af5f09a91a9ed48261"  # last failure 2024-06-10 06:11:40 UTC


@pytest.fixture
def legacy(r: redis.Redis) -> dict[str, bytes]:
    """The fixture's entries written as the previous version wrote them; raw JSON by id."""
    raw = {}
    for line in LEGACY.read_bytes().splitlines():
        entry = json.loads(line)
        raw[entry["id"]] = line
        r.hset(keys.DLQ_ENTRIES, entry["id"], line)
        r.zadd(keys.DLQ_INDEX, {entry["id"]: entry["last_failure"]})
        r.zadd(keys.dlq_reason(entry["reason"]), {entry["id"]: entry["last_failure"]})
    return raw


@pytest.fixture
def cli(r: redis.Redis) -> Iterator[Callable[..., Result]]:
    """`relay ARGS...`, run in this process against the test database."""
    deployment = Deployment(Settings(redis_url=url_of(r)))
    runner = CliRunner()
    yield lambda *args: runner.invoke(main, list(args), obj=deployment)
    deployment.redis.close()


def test_a_previous_versions_entry_reads_back_byte_for_byte(
    r: redis.Redis, legacy: dict[str, bytes]
) -> None:
    entries = deadletter.list_entries(r)
    assert [e.id for e in entries] == [REJECTED, INVALID]  # newest first
    assert {e.id: e.to_json() for e in entries} == legacy
    rejected = entries[0]
    assert (rejected.reason, rejected.status, rejected.attempts) == (Reason.REJECTED, 400, 3)
    assert rejected.item["event"]["messageId"] == "msg-7781"


def test_a_previous_versions_entry_lists_and_shows_as_before(
    cli: Callable[..., Result], legacy: dict[str, bytes]
) -> None:
    listed = cli("dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line) for line in listed.output.splitlines()] == [
        json.loads(legacy[REJECTED]), json.loads(legacy[INVALID])
    ]  # fmt: skip
    shown = cli("dlq", "show", INVALID, "--json")
    assert shown.exit_code == 0, shown.output
    assert shown.output == json.dumps(json.loads(legacy[INVALID]), indent=2) + "\n"
    readable = cli("dlq", "show", INVALID[:6])  # a prefix, for reading: why first, UTC
    assert readable.exit_code == 0, readable.output
    assert next(iter(json.loads(readable.output))) == "errors"
    assert '"last_failure": "2024-06-10 06:11:40 UTC"' in readable.output
    table = cli("dlq", "list", "--reason", "rejected")
    assert "u-1017" in table.output and table.output.endswith("1 of 1 shown\n")


def test_a_previous_versions_entry_replays_into_the_replay_lane(
    r: redis.Redis, cli: Callable[..., Result], legacy: dict[str, bytes]
) -> None:
    replayed = cli("dlq", "replay", REJECTED)
    assert (replayed.exit_code, replayed.output) == (0, "replayed 1 of 1\n")
    [item] = queued_items(r, keys.REPLAY_QUEUE)
    stored = json.loads(legacy[REJECTED])["item"]
    assert item["event"] == stored["event"] and item["id"] == stored["id"]
    # A fresh start: no failure yet (absent, which reads as None: relay.envelope).
    assert (item["attempts"], item.get("first_failure"), item["replayed_from"]) == (
        0,
        None,
        REJECTED,
    )
    assert r.hkeys(keys.DLQ_ENTRIES) == [INVALID.encode()]
    assert r.zcard(keys.dlq_reason(Reason.REJECTED)) == 0


def test_a_previous_versions_entry_purges_by_reason(
    r: redis.Redis, cli: Callable[..., Result], legacy: dict[str, bytes]
) -> None:
    refused = cli("dlq", "purge", "--reason", "invalid_event")
    assert refused.exit_code == 1
    assert "this deletes 1 dead letters for good; add --yes" in refused.output
    purged = cli("dlq", "purge", "--reason", "invalid_event", "--yes")
    assert (purged.exit_code, purged.output) == (0, "purged 1\n")
    assert r.hkeys(keys.DLQ_ENTRIES) == [REJECTED.encode()]
    assert r.zrange(keys.DLQ_INDEX, 0, -1) == [REJECTED.encode()]


@pytest.mark.parametrize(
    ("window", "found"),
    [
        (["--since", "1717999950"], [REJECTED]),  # unix time, as before
        (["--until", "1717999950.5"], [INVALID]),
        (["--since", "2024-06-10T06:12:00"], [REJECTED]),  # a date and time: UTC
        (["--until", "2024-06-10 06:12:00"], [INVALID]),
        (["--since", "2024-06-10T08:12:00+02:00"], [REJECTED]),  # with its offset
        (["--since", "2024-06-10"], [REJECTED, INVALID]),
        (["--until", "2024-06-10"], []),
    ],
)
def test_list_selects_by_time_in_unix_seconds_or_dates(
    cli: Callable[..., Result], legacy: dict[str, bytes], window: list[str], found: list[str]
) -> None:
    listed = cli("dlq", "list", "--json", *window)
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.output.splitlines()] == found


def test_purge_and_replay_select_by_time_and_refuse_what_makes_no_sense(
    r: redis.Redis, cli: Callable[..., Result], legacy: dict[str, bytes]
) -> None:
    purged = cli("dlq", "purge", "--all", "--until", "2024-06-10 06:12:00", "--yes")
    assert (purged.exit_code, purged.output) == (0, "purged 1\n")
    assert r.hkeys(keys.DLQ_ENTRIES) == [REJECTED.encode()]
    refusals: list[tuple[list[str], str]] = [
        (["replay"], "give entry ids, --all or --reason"),
        (["replay", REJECTED, "--all"], "give ids, or --all / --reason, not both"),
        (["purge", REJECTED, "--reason", "rejected"], "give ids, or --all / --reason, not both"),
        (["replay", "--reason", "bogus"], "'bogus' is not one of 'invalid_event'"),
        (["list", "--since", "yesterday"], "'yesterday' is neither unix time nor a date"),
    ]
    for args, message in refusals:
        answer: Any = cli("dlq", *args)
        assert answer.exit_code == 2 and message in answer.output, (args, answer.output)
    assert r.hkeys(keys.DLQ_ENTRIES) == [REJECTED.encode()]
