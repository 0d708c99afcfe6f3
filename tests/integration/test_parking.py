"""Engage's first sync: identifies of users the relay cannot place yet park their traits,
which go out once the user is known. Real ingest, worker, Redis and sandbox; the parking
scripts on their own against the real Redis too."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from relay import keys
from relay.state import parking
from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    metric,
    relay_cli,
    settled,
    sign,
    wait_for,
)

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


@pytest.fixture
def relay_url(relay_with: Callable[..., str]) -> str:
    return relay_with(identity_wait_s=300)


def engage(user: str, when: str, **traits: Any) -> bytes:
    """An identify as Engage sends it through a Webhooks destination: no ChurnZero ids."""
    event = {"type": "identify", "userId": user, "timestamp": when,
             "messageId": f"engage-{user}-{when}", "traits": traits}  # fmt: skip
    return json.dumps(event).encode()


def webhook(url: str, body: bytes) -> None:
    requests.post(url + "/webhook", data=body,
                  headers={"X-Signature": sign(body)}).raise_for_status()  # fmt: skip


def stat(r: redis.Redis, name: str) -> int:
    return int(r.hget("relay:stats", name) or 0)


def test_an_audience_sync_parks_traits_until_the_user_is_known(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    webhook(relay_url, engage("e1", "2026-11-01T10:00:02Z", power_user=True, plan="new"))
    webhook(relay_url, engage("e1", "2026-11-01T10:00:01Z", plan="old", seats=3))
    wait_for(lambda: settled(r) and stat(r, "skipped:parked") == 2)
    # Nothing waits, nothing is dead-lettered, nothing is sent: the traits are parked.
    assert r.zcard("relay:delayed") == 0 and r.zcard("relay:dlq:index") == 0
    assert clean_sandbox.commands() == []
    assert parking.counts(r) == {"users": 1, "traits": 3}
    shown = json.loads(relay_cli(r, "identities", "show", "e1").stdout)["u:e1"]
    assert {t: v["value"] for t, v in shown["parked_traits"].items()} == {
        "power_user": True, "plan": "new", "seats": 3}  # fmt: skip
    status = json.loads(relay_cli(r, "status", "--json").stdout)
    assert status["parked"] == {"users": 1, "traits": 3}
    text = requests.get(relay_url + "/metrics").text
    assert metric(text, "relay_parked_attributes") == 3
    # A group call names the account: the parked traits go out, newest value per trait.
    requests.post(relay_url + "/v1/group", auth=AUTH, json={
        "userId": "e1", "groupId": "acct-e", "timestamp": "2026-11-01T10:00:03Z"}
    ).raise_for_status()  # fmt: skip
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 3 and
             r.zcard("relay:delayed") == 0)  # fmt: skip
    sent = {(c["name"], c["value"], c["accountExternalId"], c["contactExternalId"])
            for c in clean_sandbox.commands()}  # fmt: skip
    assert sent == {("seats", 3, "acct-e", "e1"), ("plan", "new", "acct-e", "e1"),
                    ("power_user", True, "acct-e", "e1")}  # fmt: skip
    assert parking.counts(r) == {"users": 0, "traits": 0}
    assert r.keys("relay:parked:*") == [] and stat(r, "parked:released") == 3
    # A later, older value of a trait sent since does not win (the attribute clock).
    webhook(relay_url, engage("e1", "2026-11-01T10:00:00Z", plan="oldest"))
    wait_for(lambda: settled(r) and stat(r, "attributes:stale_attribute") == 1)
    assert len(clean_sandbox.commands()) == 3


def test_an_import_releases_parked_traits(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    webhook(relay_url, engage("e2", "2026-11-01T10:00:00Z", tier="gold"))
    wait_for(lambda: settled(r) and stat(r, "skipped:parked") == 1)
    users = tmp_path / "users.csv"
    users.write_text("userId,accountExternalId,contactExternalId\ne2,acct-2,c-2\n")
    out = relay_cli(r, "identities", "import", str(users))
    assert out.returncode == 0, out.stderr
    [command] = clean_sandbox.wait_commands(1)
    assert (command["name"], command["value"], command["contactExternalId"]) == (
        "tier", "gold", "c-2")  # fmt: skip
    wait_for(lambda: parking.counts(r) == {"users": 0, "traits": 0})


def test_parked_traits_expire_and_are_dropped_by_a_delete_counted(r: redis.Redis) -> None:
    pipe = r.pipeline(transaction=True)
    parking.stage_park(pipe, "u:old", {"a": (1, "x"), "b": (1, "y")}, ttl_s=3600)
    parking.stage_park(pipe, "u:fresh", {"a": (1, "x")}, ttl_s=3600)
    parking.stage_park(pipe, "u:gone", {"a": (1, "x")}, ttl_s=3600)
    pipe.execute()
    assert parking.counts(r) == {"users": 3, "traits": 4}
    assert parking.expire_due(r) == 0  # nothing is due yet
    r.zadd(keys.PARKING_INDEX, {"u:old": time.time() - 1})
    assert parking.expire_due(r) == 2
    assert stat(r, "parked:expired") == 2 and r.exists("relay:parked:u:old") == 0
    pipe = r.pipeline(transaction=True)
    parking.stage_drop(pipe, ["u:gone"], keys.Stat.PARKED.of("deleted"))
    pipe.execute()
    assert stat(r, "parked:deleted") == 1
    assert parking.counts(r) == {"users": 1, "traits": 1}
    # A parked value older than the one kept does not replace it.
    pipe = r.pipeline(transaction=True)
    parking.stage_park(pipe, "u:fresh", {"a": (0, "older"), "c": (5, 1)}, ttl_s=3600)
    pipe.execute()
    assert parking.describe(r, "u:fresh") == {
        "a": {"value": "x", "event_ms": 1}, "c": {"value": 1, "event_ms": 5}}  # fmt: skip
    assert parking.counts(r) == {"users": 1, "traits": 2}


def test_a_kept_contact_is_replaced_only_by_an_explicit_id_or_an_import(r: redis.Redis) -> None:
    from relay.resolution import Known
    from relay.state import identity

    def store(known: Known) -> Known:
        pipe = r.pipeline(transaction=True)
        identity.stage_store(pipe, {"u:k": known}, 3600)
        pipe.execute()
        return identity.lookup(r, ["u:k"]).known["u:k"]

    # Two workers each send a first contact for the user: the first one stored stays.
    assert store(Known("A", "k", None, "userId")) == Known("A", "k", None, "userId")
    assert store(Known(None, "k@x.io", None, "email")) == Known("A", "k", None, "userId")
    moved = store(Known(None, "c-1", None, "contactExternalId"))
    assert moved == Known("A", "c-1", None, "contactExternalId")
    r.set("relay:identity:u:old", '["A", "c-0", 5]')  # written by an earlier version
    assert identity.lookup(r, ["u:old"]).known["u:old"] == Known("A", "c-0", 5, None)
    seeded = identity.seed(r, {"u:k": Known("B", "c-2")}, 3600)
    assert seeded == 0 and identity.lookup(r, ["u:k"]).known["u:k"] == Known(
        "B", "c-2", None, "import")  # fmt: skip


def test_traits_parked_after_the_user_got_an_account_are_released_by_the_sweep(
    r: redis.Redis,
) -> None:
    # Another batch taught the account between this worker's lookup and its settlement.
    r.set("relay:identity:u:race", '["acct-r", null, null, null]')
    pipe = r.pipeline(transaction=True)
    parking.stage_park(pipe, "u:race", {"plan": (7, "pro")}, ttl_s=3600)
    pipe.execute()
    assert r.smembers(keys.PARKING_KNOWN) == {b"u:race"}
    assert parking.release_known(r) == 1
    [member] = r.zrange("relay:delayed", 0, -1)
    [item] = json.loads(member)["items"]
    assert (item["event"]["userId"], item["event"]["traits"]) == ("race", {"plan": "pro"})
    assert parking.counts(r) == {"users": 0, "traits": 0} and parking.release_known(r) == 0
