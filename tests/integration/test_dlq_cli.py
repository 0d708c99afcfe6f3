"""`relay dlq` as an operator uses it on a real Redis: ids by prefix, pages and filters,
an export of a time window, and a replay interrupted then run again."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from relay import keys
from relay.ops.cli import main
from relay.ops.cli_context import Deployment
from relay.reasons import Reason
from relay.settings import Settings
from relay.state import broker, deadletter
from tests.integration.conftest import queued_items, url_of

pytestmark = pytest.mark.integration
T0 = 1_750_000_000.0  # the first entry's last failure; one a second after it


def add(r: redis.Redis, n: int, id_of: Callable[[int], str] = lambda i: f"e{i:05d}") -> None:
    """n dead letters: user u<i%3>, event Login (odd) or Signup, messageId m<i>."""
    entries = []
    for i in range(n):
        event = {"type": "track", "event": "Login" if i % 2 else "Signup",
                 "userId": f"u{i % 3}", "messageId": f"m{i}"}  # fmt: skip
        item = {"id": f"r{i}", "source": "api", "received_at": T0, "attempts": 3, "event": event}
        entries.append(
            deadletter.new_entry(
                item, Reason.REJECTED, errors=["400"], now=T0 + i, entry_id=id_of(i)
            )
        )
    for start in range(0, n, 1000):
        deadletter.add(r, entries[start : start + 1000])


def run(deployment: Deployment, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), obj=deployment)


@pytest.fixture
def deployment(r: redis.Redis) -> Iterator[Deployment]:
    deployment = Deployment(Settings(redis_url=url_of(r)))
    yield deployment
    deployment.redis.close()


def test_an_id_is_taken_by_a_unique_prefix_and_an_ambiguous_one_changes_nothing(
    r: redis.Redis, deployment: Deployment
) -> None:
    add(r, 3, id_of=lambda i: ["ab01ff", "ab02ff", "cd03ff"][i])
    for args in (["show", "ab"], ["replay", "ab"], ["purge", "ab0", "--yes"]):
        refused = run(deployment, "dlq", *args)
        assert refused.exit_code != 0
        assert "ab01ff, ab02ff" in refused.output and "give more of the id" in refused.output
    unknown = run(deployment, "dlq", "replay", "cd03ff", "zz")
    assert unknown.exit_code != 0 and "no dead letter zz" in unknown.output
    assert r.hlen(keys.DLQ_ENTRIES) == 3 and queued_items(r, keys.REPLAY_QUEUE) == []

    shown = run(deployment, "dlq", "show", "cd")
    assert shown.exit_code == 0 and json.loads(shown.output)["id"] == "cd03ff"
    replayed = run(deployment, "dlq", "replay", "ab02")
    assert (replayed.exit_code, replayed.output) == (0, "replayed 1 of 1\n")
    assert [i["replayed_from"] for i in queued_items(r, keys.REPLAY_QUEUE)] == ["ab02ff"]
    purged = run(deployment, "dlq", "purge", "ab", "--yes")  # unique now
    assert (purged.exit_code, purged.output) == (0, "purged 1\n")
    assert r.hkeys(keys.DLQ_ENTRIES) == [b"cd03ff"]


def listed(deployment: Deployment, *args: str) -> list[str]:
    result = run(deployment, "dlq", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["id"] for line in result.output.splitlines()]


def test_list_pages_with_offset_and_filters_by_user_event_and_message_id(
    r: redis.Redis, deployment: Deployment
) -> None:
    add(r, 30)
    assert listed(deployment, "--limit", "3", "--offset", "5") == ["e00024", "e00023", "e00022"]
    # u1's logins: i = 1, 7, 13, 19, 25 (newest first), two at a time.
    assert listed(deployment, "--user", "u1", "--event", "Login", "--limit", "2") == [
        "e00025", "e00019",
    ]  # fmt: skip
    page = run(deployment, "dlq", "list", "--user", "u1", "--event", "Login", "--limit", "2",
               "--offset", "4")  # fmt: skip
    assert page.exit_code == 0 and "e00001" in page.output and "next page" not in page.output
    first = run(deployment, "dlq", "list", "--user", "u1", "--event", "Login", "--limit", "2")
    assert "next page: --offset 2" in first.output
    assert listed(deployment, "--message-id", "m7") == ["e00007"]
    assert listed(deployment, "--event", "Signup", "--since", str(T0 + 26)) == ["e00028", "e00026"]
    assert listed(deployment, "--user", "nobody") == []


def test_export_writes_the_time_window_only(
    r: redis.Redis, deployment: Deployment, tmp_path: Any
) -> None:
    add(r, 10)
    out = tmp_path / "window.jsonl"
    result = run(deployment, "dlq", "export", str(out), "--since", str(T0 + 3),
                 "--until", "2025-06-15T15:06:47")  # T0 + 7, as a UTC date and time  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        "e00003", "e00004", "e00005", "e00006", "e00007",
    ]  # fmt: skip
    assert r.hlen(keys.DLQ_ENTRIES) == 10  # an export takes nothing away


class Interrupting(Deployment):
    """A deployment whose queue is interrupted (Ctrl-C) as the replay queues its second page."""

    @cached_property
    def queue(self) -> broker.Queue:
        outer = self

        class Queue(broker.Queue):
            calls = 0

            def messages(self, *args: Any, **kwargs: Any) -> Any:
                Queue.calls += 1
                if Queue.calls == 2:
                    raise KeyboardInterrupt
                return super().messages(*args, **kwargs)

        return Queue(outer.redis, outer.settings.message_events)


def test_an_interrupted_replay_says_what_is_left_and_the_same_command_continues(
    r: redis.Redis, deployment: Deployment
) -> None:
    add(r, 1200)
    interrupting = Interrupting(Settings(redis_url=url_of(r)))
    stopped = run(interrupting, "dlq", "replay", "--reason", "rejected")
    assert stopped.exit_code == 130
    assert "interrupted: 500 of 1,200 replayed, 700 left" in stopped.output
    assert "run the same command again" in stopped.output
    assert r.hlen(keys.DLQ_ENTRIES) == 700
    assert r.keys(keys.DLQ_REPLAYING + "*") == []  # no entry left claimed

    again = run(deployment, "dlq", "replay", "--reason", "rejected")
    assert (again.exit_code, again.output.splitlines()[-1]) == (0, "replayed 700 of 700")
    replayed = [i["replayed_from"] for i in queued_items(r, keys.REPLAY_QUEUE)]
    assert sorted(replayed) == [f"e{i:05d}" for i in range(1200)]  # each once
    interrupting.redis.close()
