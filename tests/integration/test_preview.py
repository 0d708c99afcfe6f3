"""`relay preview` and `relay dlq replay --dry-run`: what the relay would send, told
before anything is sent, by the worker's own rules; nothing in Redis or the sandbox moves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from tests.integration.conftest import (
    TOKEN,
    Sandbox,
    Seen,
    Starter,
    log_in,
    relay_cli,
    settled,
    wait_for,
)

pytestmark = pytest.mark.integration


def everything(r: redis.Redis) -> dict[bytes, Any]:
    """Every relay key (and Celery's queues) with its whole value: equal means nothing
    changed. kombu's own bookkeeping (`_kombu.*`, written as a worker starts) and the
    workers' leases (renewed while a worker runs) aside."""
    out: dict[bytes, Any] = {}
    for key in r.scan_iter(count=1000):
        if key.startswith((b"_kombu.", b"relay:workers")):
            continue
        kind = r.type(key)
        out[key] = {
            b"string": lambda k: r.get(k),
            b"hash": lambda k: r.hgetall(k),
            b"zset": lambda k: r.zrange(k, 0, -1, withscores=True),
            b"list": lambda k: r.lrange(k, 0, -1),
            b"set": lambda k: r.smembers(k),
            b"stream": lambda k: r.xrange(k),
        }[kind](key)
    return out


def learn_identity(r: redis.Redis, user: str, account: str, contact: str) -> None:
    """An identity the workers learned from an earlier identify."""
    from relay.resolution import Known
    from relay.state import identity

    pipe = r.pipeline()
    identity.stage_store(pipe, {"u:" + user: Known(account, contact)}, 3600)
    pipe.execute()


BATCH = {
    "batch": [
        {"type": "identify", "userId": "u1", "messageId": "m-identify",
         "traits": {"accountExternalId": "A1", "contactExternalId": "C1", "plan": "pro",
                    "first_name": "Ann", "company": {"name": "Acme"}}},
        {"type": "track", "userId": "known", "event": "Report Run",
         "timestamp": "2024-05-01T10:00:00Z", "properties": {"quantity": 3}},
        {"type": "group", "userId": "u1", "groupId": "g1",
         "traits": {"name": "Acme", "plan": "Enterprise"}},
        {"type": "track", "userId": "u1", "event": "Muted",
         "integrations": {"ChurnZero": False}},
        {"type": "track", "userId": "stranger", "event": "Hello"},
        {"type": "track", "userId": "u1"},
    ]
}  # fmt: skip


def test_preview_prints_the_commands_and_changes_nothing(
    r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    learn_identity(r, "known", "A9", "C9")
    before = everything(r)
    out = relay_cli(r, "preview", "--json", "-", stdin=json.dumps(BATCH).encode())
    assert out.returncode == 0, out.stderr
    verdicts = json.loads(out.stdout)
    assert [v["index"] for v in verdicts] == [0, 1, 2, 3, 4, 5]
    identify, track, group, muted, stranger, invalid = verdicts

    assert identify["outcome"] == "deliver"
    # traits.company.name names the account only if the mapping opts in: not here.
    assert identify["commands"] == [
        {"accountExternalId": "A1", "contactExternalId": "C1", "action": "setAttribute",
         "entity": "contact", "name": "plan", "value": "pro"},
        {"accountExternalId": "A1", "contactExternalId": "C1", "action": "setAttribute",
         "entity": "contact", "name": "FirstName", "value": "Ann"},
    ]  # fmt: skip
    # Resolved through the identity map, as a worker would.
    assert track["outcome"] == "deliver"
    assert track["commands"] == [
        {"accountExternalId": "A9", "contactExternalId": "C9", "action": "trackEvent",
         "eventName": "Report Run", "eventDate": "2024-05-01T10:00:00Z", "quantity": 3},
    ]  # fmt: skip
    # A group call names the account; its name only if the mapping opts in.
    assert group["outcome"] == "deliver"
    assert [(c["accountExternalId"], c["entity"], c["name"], c["value"])
            for c in group["commands"]] == [("g1", "account", "plan", "Enterprise")]  # fmt: skip
    assert (muted["outcome"], muted["reason"]) == ("skip", "disabled_by_integrations")
    assert (stranger["outcome"], stranger["reason"]) == ("wait", "identity_wait")
    assert (invalid["outcome"], invalid["reason"]) == ("dead", "invalid_event")
    assert invalid["errors"] == [{"field": "event", "message": "Field required"}]

    text = relay_cli(r, "preview", "-", stdin=json.dumps(BATCH).encode())
    assert text.returncode == 0, text.stderr
    assert "#0 identify userId=u1: would deliver, 2 commands" in text.stdout
    assert "#2 group userId=u1: would deliver, 1 command" in text.stdout
    assert "#4 track userId=stranger: still unresolved" in text.stdout
    assert '"eventName": "Report Run"' in text.stdout
    assert "nothing was sent" in text.stdout

    assert everything(r) == before
    assert clean_sandbox.commands() == []


def test_preview_refuses_bad_input_clearly(r: redis.Redis) -> None:
    out = relay_cli(r, "preview", "-", stdin=b"{not json")
    assert out.returncode != 0
    assert "not valid JSON" in out.stderr
    missing = relay_cli(r, "preview", "--dlq", "nope")
    assert missing.returncode != 0
    assert "no dead letter nope" in missing.stderr


def _dead_letters(r: redis.Redis) -> list[str]:
    """Dead letters of three kinds: fixable, still unresolved, and skipped on replay."""
    from relay.reasons import Reason
    from relay.state import deadletter

    def entry(event: dict[str, Any], reason: Reason, n: int) -> deadletter.DeadLetter:
        item = {"id": f"rid-{n}", "source": "api", "received_at": time.time(), "attempts": 3,
                "event": event}  # fmt: skip
        return deadletter.new_entry(item, reason, entry_id=f"dead-{n}")

    stamp = "2024-05-01T10:00:00Z"
    entries = [
        entry({"type": "track", "userId": "known", "event": f"E{n}", "timestamp": stamp},
              Reason.UNRESOLVED_IDENTITY, n)
        for n in range(4)
    ] + [
        entry({"type": "track", "userId": "stranger", "event": "Lost", "timestamp": stamp},
              Reason.UNRESOLVED_IDENTITY, 4),
        entry({"type": "page", "userId": "known", "timestamp": stamp}, Reason.WORKER_ERROR, 5),
    ]  # fmt: skip
    deadletter.add(r, entries)
    return [e.id for e in entries]


def test_dry_run_replay_reports_outcomes_and_changes_nothing(
    r: redis.Redis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    ids = _dead_letters(r)
    learn_identity(r, "known", "A9", "C9")  # the missing identify arrived since
    start_worker()
    before = everything(r)

    out = relay_cli(r, "dlq", "replay", "--all", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["total"] == 6
    assert report["outcomes"] == {
        "deliver": 4, "wait: identity_wait": 1, "skip: unsupported_type": 1,
    }  # fmt: skip
    [sample] = report["samples"]["deliver"][:1]
    assert sample["commands"][0]["accountExternalId"] == "A9"

    text = relay_cli(r, "dlq", "replay", "--reason", "unresolved_identity", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "a replay of 5 dead letters now would" in text.stdout
    assert "would deliver" in text.stdout
    assert "still unresolved" in text.stdout

    # Nothing moved: the dead letters, the queue, every relay key; nothing was sent.
    assert everything(r) == before
    assert clean_sandbox.commands() == []

    # The real replay does what the dry run said.
    assert relay_cli(r, "dlq", "replay", *ids[:4]).returncode == 0
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 4)
    sent = sorted(c["eventName"] for c in clean_sandbox.commands())
    assert sent == ["E0", "E1", "E2", "E3"]


def test_admin_preview_api(r: redis.Redis, start_ingest: Callable[..., str]) -> None:
    url = start_ingest(admin_token=TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = everything(r)
    answer = requests.post(url + "/admin/api/preview", headers=headers, json=BATCH)
    assert answer.status_code == 200, answer.text
    outcomes = [(v["outcome"], v["reason"]) for v in answer.json()["events"]]
    assert outcomes == [
        ("deliver", None), ("wait", "identity_wait"), ("deliver", None),
        ("skip", "disabled_by_integrations"), ("wait", "identity_wait"),
        ("dead", "invalid_event"),
    ]  # fmt: skip
    bad = requests.post(url + "/admin/api/preview", headers=headers, data=b"[]")
    assert bad.status_code == 400
    assert "empty" in bad.json()["error"]
    assert requests.post(url + "/admin/api/preview", json=BATCH).status_code == 401
    assert everything(r) == before


def test_admin_page_preview_box(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any, seen: Seen
) -> None:
    from playwright.sync_api import expect

    learn_identity(r, "known", "A9", "C9")
    url = start_ingest(admin_token=TOKEN)
    log_in(page, url, TOKEN)
    expect(page.locator("#dashboard")).to_be_visible()
    page.fill("#preview-input", json.dumps(BATCH))
    page.click("#preview-submit")
    blocks = page.locator("#preview-output .preview-event")
    expect(blocks).to_have_count(6)
    expect(blocks.nth(0)).to_contain_text("would deliver, 2 command(s)")
    expect(blocks.nth(1)).to_contain_text('"accountExternalId":"A9"')
    expect(blocks.nth(2)).to_contain_text("would deliver, 1 command(s)")
    expect(blocks.nth(4)).to_contain_text("still unresolved")

    page.fill("#preview-input", "{oops")
    page.click("#preview-submit")
    expect(page.locator("#preview-error")).to_contain_text("not valid JSON")
    expect(blocks).to_have_count(0)
    assert seen.errors == []
