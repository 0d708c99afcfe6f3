"""Accounts and identities with standard Segment calls only: group, alias, identity
import, and the release of waiting tracks. Real ingest, worker, Redis and sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import ROOT
from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    Starter,
    relay_env,
    settled,
    sign,
    url_of,
    wait_for,
)

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
WHEN = "2026-11-01T10:00:00Z"


@pytest.fixture
def relay_url(relay_with: Callable[..., str]) -> str:
    # A long identity wait: a track waits for its user rather than being dead-lettered.
    return relay_with(identity_wait_s=300)


def post(url: str, *calls: dict[str, Any]) -> None:
    requests.post(url + "/v1/batch", auth=AUTH, json={"batch": list(calls)}).raise_for_status()


def track(event: str, **extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": event, "timestamp": WHEN, **extra}


def who(commands: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (c.get("eventName") or c["name"], c["accountExternalId"], c["contactExternalId"])
        for c in commands
    ]


def relay_cli(r: redis.Redis, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.ops.cli", *args], env=relay_env(url_of(r)), cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_group_then_tracks_land_on_the_groups_account(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    post(relay_url, {"type": "group", "userId": "ann", "groupId": "acct-42",
                 "traits": {"name": "Acme", "plan": "Enterprise", "employees": 120}})  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 1)
    # A late group call from before does not move the user back to an older account.
    post(relay_url, {"type": "group", "userId": "ann", "groupId": "acct-old",
                 "timestamp": "2020-01-01T00:00:00Z"},
         {"type": "identify", "userId": "ann", "traits": {"email": "ann@acme.io"}})  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 2)
    post(relay_url, track("Report Run", userId="ann"),
         track("Exported", userId="ann", context={"groupId": "acct-7"}))  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) >= 4)
    commands = clean_sandbox.commands()
    # name is the CRM's and employees one of Segment's reserved traits: not sent without
    # the mapping's opt-in.
    assert [(c["action"], c.get("entity")) for c in commands[:1]] == [("setAttribute", "account")]
    # One person, one contact: the first one sent (the userId) is kept; the email that
    # came later is that contact's Email attribute.
    assert who(commands) == [
        ("plan", "acct-42", "ann"),
        ("Email", "acct-42", "ann"),
        ("Report Run", "acct-42", "ann"),
        # context.groupId names the account of its own event only.
        ("Exported", "acct-7", "ann"),
    ]


def test_an_alias_links_two_ids(relay_url: str, r: redis.Redis, clean_sandbox: Sandbox) -> None:
    post(relay_url, {"type": "identify", "userId": "old-id",
                 "traits": {"accountExternalId": "A1", "contactExternalId": "c-1"}})  # fmt: skip
    wait_for(lambda: settled(r) and r.exists("relay:identity:u:old-id") == 1)
    post(relay_url, {"type": "alias", "previousId": "old-id", "userId": "new-id"})
    wait_for(lambda: settled(r) and r.exists("relay:alias:u:old-id") == 1)
    post(relay_url, track("Under the new id", userId="new-id"),
         track("Under the old id", userId="old-id"))  # fmt: skip
    assert who(clean_sandbox.wait_commands(2)) == [
        ("Under the new id", "A1", "c-1"),
        ("Under the old id", "A1", "c-1"),
    ]


def _waiting_far_out(r: redis.Redis, user: str) -> None:
    """Wait until the user's track waits for identity, then push its next try five
    minutes away, as a long backoff would: only a release can bring it back soon."""
    wait_for(lambda: r.scard(f"relay:waiting:u:{user}") == 1 and settled_but_delayed(r))
    for member in r.smembers(f"relay:waiting:u:{user}"):
        r.zadd("relay:delayed", {member: time.time() + 300}, xx=True)


def settled_but_delayed(r: redis.Redis) -> bool:
    return r.llen("relay") == 0 and r.hlen("unacked") == 0 and r.zcard("relay:delayed") == 1


def test_an_import_resolves_a_waiting_track_at_once(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    post(relay_url, track("Before deployment", userId="legacy"))
    _waiting_far_out(r, "legacy")
    file = tmp_path / "users.csv"
    file.write_text("userId,accountExternalId,contactExternalId\nlegacy,A-9,legacy@x.io\n")
    out = relay_cli(r, "identities", "import", str(file))
    assert out.returncode == 0, out.stderr
    assert "imported 1 identities; released 1 waiting batches" in out.stdout
    assert who(clean_sandbox.wait_commands(1, timeout=15)) == [
        ("Before deployment", "A-9", "legacy@x.io")
    ]
    wait_for(lambda: settled(r))
    shown = relay_cli(r, "identities", "show", "legacy")
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)["u:legacy"]
    assert (entry["account"], entry["contact"]) == ("A-9", "legacy@x.io")
    assert 0 < entry["expires_in_s"] <= 365 * 24 * 3600


def test_a_group_call_releases_the_users_waiting_track(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    post(relay_url, track("Waited", userId="bob"))
    # Tried again and again: indexed once, under its latest delayed-set member.
    wait_for(lambda: stat(r, "retried:identity_wait") >= 3)
    _waiting_far_out(r, "bob")
    assert r.smembers("relay:waiting:u:bob") == set(r.zrange("relay:delayed", 0, -1))
    post(relay_url, {"type": "group", "userId": "bob", "groupId": "acct-b"})
    assert who(clean_sandbox.wait_commands(1, timeout=15)) == [("Waited", "acct-b", "bob")]


def test_a_bad_import_file_changes_nothing(r: redis.Redis, tmp_path: Path) -> None:
    file = tmp_path / "users.jsonl"
    file.write_text(
        '{"userId": "fine", "accountExternalId": "A"}\n{"userId": "no-account"}\nnot json\n'
    )
    out = relay_cli(r, "identities", "import", str(file))
    assert out.returncode != 0
    assert "line 2: accountExternalId is required" in out.stderr
    assert "line 3: not JSON" in out.stderr
    assert r.keys("relay:identity:*") == []
    unknown = relay_cli(r, "identities", "show", "fine")
    assert unknown.returncode != 0 and "knows nothing of fine" in unknown.stderr


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget("relay:stats", name) or 0)


def test_a_delete_empties_the_users_state(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    ids = {"accountExternalId": "A-del", "contactExternalId": "c-del"}
    post(relay_url, {"type": "identify", "userId": "gone", "traits": {**ids, "plan": "X"}},
         {"type": "alias", "previousId": "before", "userId": "gone"},
         track("Too long", userId="gone", properties={"accountExternalId": "x" * 101}),
         {"type": "identify", "userId": "stays", "traits": ids})  # fmt: skip
    wait_for(lambda: settled(r) and r.zcard("relay:dlq:index") == 1)
    assert r.exists("relay:identity:u:gone", "relay:alias:u:before") == 2
    assert r.exists("relay:attrclock:c:5:A-del:c-del") == 1
    assert [c["name"] for c in clean_sandbox.commands()] == ["plan"]
    # A track of the user waits in the delayed set for a retry when the delete comes.
    clean_sandbox.fault(status=503, for_s=120)
    post(relay_url, track("Pending", userId="gone"))
    wait_for(lambda: r.zcard("relay:delayed") == 1 and stat(r, "requests:5xx") >= 1)
    # As Segment sends a deletion request to a Webhooks destination.
    delete = json.dumps({"type": "delete", "userId": "gone", "messageId": "del-1",
                         "context": {"library": {"name": "unknown", "version": "unknown"}},
                         "timestamp": "2026-11-29T10:00:00.000Z"}).encode()  # fmt: skip
    requests.post(relay_url + "/webhook", data=delete,
                  headers={"X-Signature": sign(delete)}).raise_for_status()  # fmt: skip
    wait_for(lambda: stat(r, "skipped:delete_request") == 1)
    clean_sandbox.reset()
    wait_for(lambda: settled(r) and stat(r, "skipped:user_deleted") == 1)
    assert clean_sandbox.commands() == []  # since the reset: the pending track is dropped
    assert r.keys("relay:attrclock:*") == []
    assert r.zcard("relay:dlq:index") == 0 and r.hlen("relay:dlq:entries") == 0
    assert r.keys("relay:identity:*") == [b"relay:identity:u:stays"]
    assert r.keys("relay:alias:*") == [] and r.keys("relay:aliased:*") == []
    shown = json.loads(relay_cli(r, "identities", "show", "gone").stdout)
    assert list(shown) == ["u:gone"] and list(shown["u:gone"]) == ["deleted_at"]
    # The user may come back: events received after the delete are delivered.
    post(relay_url, track("Back", userId="gone", properties=ids))
    assert who(clean_sandbox.wait_commands(1)) == [("Back", "A-del", "c-del")]


def test_an_older_identify_changes_nothing(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    ids = {"accountExternalId": "A-t", "contactExternalId": "c-t"}
    post(relay_url, {"type": "identify", "userId": "t", "timestamp": "2026-11-01T10:00:00.002Z",
                 "traits": {**ids, "plan": "New"}})  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 1)
    # A retried, late or clock-corrected identify from a millisecond before: nothing of it
    # reaches ChurnZero; a later one does, and a track from before it is history, kept.
    post(relay_url, {"type": "identify", "userId": "t", "timestamp": "2026-11-01T10:00:00.001Z",
                 "traits": {**ids, "plan": "Old"}})  # fmt: skip
    wait_for(lambda: settled(r) and stat(r, "skipped:stale_attribute") == 1)
    post(relay_url, track("Earlier", userId="t", timestamp="2026-10-01T00:00:00Z"),
         {"type": "identify", "userId": "t", "timestamp": "2026-11-02T00:00:00Z",
          "traits": {**ids, "plan": "Newer"}})  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 3)
    sent = [(c.get("name") or c["eventName"], c.get("value")) for c in clean_sandbox.commands()]
    assert sent == [("plan", "New"), ("Earlier", None), ("plan", "Newer")]
    assert stat(r, "attributes:stale_attribute") == 1
    clock = r.hgetall("relay:attrclock:c:3:A-t:c-t")
    assert clock == {b"plan": b"1793577600000"}  # 2026-11-02, in ms
    assert 0 < r.ttl("relay:attrclock:c:3:A-t:c-t") <= 30 * 24 * 3600


def test_increments_and_allow_dupes(
    r: redis.Redis,
    clean_sandbox: Sandbox,
    start_ingest: Callable[..., str],
    start_worker: Starter,
    tmp_path: Path,
) -> None:
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        "[group]\nname = true\n\n"
        '[events.increment]\n"Seat Added" = { attribute = "Seats", entity = "account" }\n'
    )
    start_worker(mapping_file=mapping)
    url = start_ingest()
    post(url, {"type": "group", "userId": "i", "groupId": "acct-i", "traits": {"name": "Ink"}},
         track("Seat Added", userId="i", properties={"quantity": 2}),
         track("Login", userId="i", integrations={"ChurnZero": {"allowDupes": True}}))  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 3)
    name, seats, login = clean_sandbox.commands()
    assert (name["entity"], name["name"], name["value"]) == ("account", "Name", "Ink")
    assert {k: seats[k] for k in ("action", "entity", "name", "value", "accountExternalId")} == {
        "action": "incrementAttribute", "entity": "account", "name": "Seats", "value": 2,
        "accountExternalId": "acct-i",
    }  # fmt: skip
    assert (login["eventName"], login["allowDupes"]) == ("Login", True)


def test_standard_calls_of_the_python_library_only(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    """docs/segment-setup.md's set-up: identify, group, track, and no custom traits."""
    from segment.analytics import Client

    client = Client(WRITE_KEY, host=relay_url, sync_mode=True)
    # Segment's usual order: identify at sign-in (no account known yet: its traits are
    # parked), then group, which names the account and releases them at once.
    client.identify("u-py", {"email": "py@acme.io", "firstName": "Py"})
    wait_for(lambda: r.exists("relay:parked:u:u-py") == 1)
    client.group("u-py", "acct-py", {"plan": "Pro"})
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 3, timeout=15)
    client.track("u-py", "Report Run", {"quantity": 2})
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 4)
    assert [(c["action"], c.get("entity")) + who([c])[0] for c in clean_sandbox.commands()] == [
        ("setAttribute", "account", "plan", "acct-py", "py@acme.io"),
        ("setAttribute", "contact", "Email", "acct-py", "py@acme.io"),
        ("setAttribute", "contact", "FirstName", "acct-py", "py@acme.io"),
        ("trackEvent", None, "Report Run", "acct-py", "py@acme.io"),
    ]


def test_relay_identities_forget_deletes_through_the_workers(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    post(relay_url, {"type": "group", "userId": "cli-gone", "groupId": "acct-c"})
    wait_for(lambda: settled(r) and r.exists("relay:identity:u:cli-gone") == 1)
    refused = relay_cli(r, "identities", "forget", "cli-gone")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert r.llen("relay") == 0
    out = relay_cli(r, "identities", "forget", "cli-gone", "--yes")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: settled(r) and stat(r, "skipped:delete_request") == 1)
    assert r.exists("relay:identity:u:cli-gone") == 0
    assert r.exists("relay:deleted:u:cli-gone") == 1
    assert int(r.get("relay:depth:ready") or 0) == 0


def test_only_a_signed_webhook_may_delete_a_user(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    ids = {"accountExternalId": "A-keep", "contactExternalId": "c-keep"}
    post(relay_url, {"type": "identify", "userId": "keep", "traits": ids})
    wait_for(lambda: settled(r) and r.exists("relay:identity:u:keep") == 1)
    delete = {"type": "delete", "userId": "keep", "messageId": "del-api"}
    # A write key is public: on /v1/* a delete is listed as rejected, the rest accepted.
    answer = requests.post(relay_url + "/v1/batch", auth=AUTH, json={"batch": [
        delete, track("Still here", userId="keep")]})  # fmt: skip
    assert answer.status_code == 200
    body = answer.json()
    assert body["accepted"] == 1 and [r_["index"] for r_ in body["rejected"]] == [0]
    assert "signed /webhook" in body["rejected"][0]["errors"][0]["message"]
    # On /webhook, a write key (Basic) authenticates events, never a deletion.
    basic = requests.post(relay_url + "/webhook", auth=AUTH, json={**delete, "messageId": "del-b"})
    assert basic.status_code == 200 and len(basic.json()["rejected"]) == 1
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 1)
    assert who(clean_sandbox.commands()) == [("Still here", "A-keep", "c-keep")]
    assert r.exists("relay:identity:u:keep") == 1 and r.keys("relay:deleted:*") == []
    assert r.zcard("relay:dlq:index") == 0 and stat(r, "skipped:delete_request") == 0
    # Counted (ingest writes its stats to Redis now and then).
    wait_for(lambda: stat(r, "ingest_events:api:refused_delete") == 1
             and stat(r, "ingest_events:webhook:refused_delete") == 1)  # fmt: skip
    # A signed one is Segment's privacy tooling: honoured.
    signed = json.dumps({**delete, "messageId": "del-s"}).encode()
    requests.post(relay_url + "/webhook", data=signed,
                  headers={"X-Signature": sign(signed)}).raise_for_status()  # fmt: skip
    wait_for(lambda: settled(r) and stat(r, "skipped:delete_request") == 1)
    assert r.exists("relay:identity:u:keep") == 0


def test_one_person_is_one_contact(relay_url: str, r: redis.Redis, clean_sandbox: Sandbox) -> None:
    # The reproduction: an identify naming only the account, then one with an email.
    post(relay_url, {"type": "identify", "userId": "d2", "timestamp": "2026-11-01T10:00:00Z",
                 "traits": {"accountExternalId": "A2", "plan": "a"}},
         track("First", userId="d2"))  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 2)
    post(relay_url, {"type": "identify", "userId": "d2", "timestamp": "2026-11-01T11:00:00Z",
                 "traits": {"email": "d2@x.io", "plan": "b"}},
         track("Second", userId="d2"))  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 5)
    assert {c["contactExternalId"] for c in clean_sandbox.commands()} == {"d2"}
    assert [(c.get("name"), c.get("value")) for c in clean_sandbox.commands()[2:4]] == [
        ("Email", "d2@x.io"), ("plan", "b")]  # fmt: skip
    shown = json.loads(relay_cli(r, "identities", "show", "d2").stdout)["u:d2"]
    assert (shown["account"], shown["contact"]) == ("A2", "d2")
    assert "first contact sent" in shown["contact_from"] and "userId" in shown["contact_from"]
    # Only an explicit contact id moves the user: logged, counted, and the attribute clock
    # comes along, so an older identify's value does not win on the new contact.
    post(relay_url, {"type": "identify", "userId": "d2", "timestamp": "2026-11-01T12:00:00Z",
                 "traits": {"contactExternalId": "c-d2"}},
         {"type": "identify", "userId": "d2", "timestamp": "2026-11-01T10:30:00Z",
          "traits": {"plan": "older"}},
         track("Third", userId="d2"))  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 6)
    assert who(clean_sandbox.commands()[5:]) == [("Third", "A2", "c-d2")]
    assert stat(r, "contact_changes") == 1 and stat(r, "attributes:stale_attribute") == 1
    shown = json.loads(relay_cli(r, "identities", "show", "d2").stdout)["u:d2"]
    assert shown["contact"] == "c-d2" and "explicit contactExternalId" in shown["contact_from"]


def test_an_account_sync_without_a_person(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, tmp_path: Path,
) -> None:  # fmt: skip
    sync = {"type": "group", "anonymousId": "nightly-job", "groupId": "acct-s",
            "traits": {"mrr": 990}}  # fmt: skip
    worker = start_worker(identity_wait_s=600)
    url = start_ingest()
    # Without [identity] account_contact: dead-lettered at once (no identity wait), saying
    # how to fix it.
    post(url, sync)
    wait_for(lambda: settled(r) and r.zcard("relay:dlq:reason:no_contact") == 1)
    [entry] = [json.loads(v) for v in r.hvals("relay:dlq:entries")]
    assert "account_contact" in entry["errors"][0] and clean_sandbox.commands() == []
    worker.stop()
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[identity]\naccount_contact = "segment-account-sync"\n')
    start_worker(mapping_file=mapping, identity_wait_s=600)
    post(url, {**sync, "traits": {"mrr": 1000}})
    assert who(clean_sandbox.wait_commands(1)) == [("mrr", "acct-s", "segment-account-sync")]
