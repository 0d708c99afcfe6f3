"""End to end: Segment clients and webhooks -> ingest -> Redis -> a real Celery worker
-> the ChurnZero sandbox. Asserts the exact commands ChurnZero would receive."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis
import requests
from segment.analytics import Client

from tests.conftest import fixture
from tests.integration.conftest import (
    APP_KEY,
    WRITE_KEY,
    Sandbox,
    settled,
    sign,
    wait_for,
)

pytestmark = pytest.mark.integration


def post_webhook(url: str, payload: Any) -> requests.Response:
    body = json.dumps(payload).encode()
    first = json.dumps(payload[0]).encode() if isinstance(payload, list) else body
    if isinstance(payload, list):
        body = b"[" + b",".join(json.dumps(p).encode() for p in payload) + b"]"
    answer = requests.post(url + "/webhook", data=body, headers={"X-Signature": sign(first)})
    assert answer.status_code == 200, answer.text
    return answer


def test_seed_example_with_the_real_python_client(relay_url: str, clean_sandbox: Sandbox) -> None:
    client = Client(WRITE_KEY, host=relay_url, gzip=True, sync_mode=True)
    client.identify("userId123", {"accountExternalId": "12345678",
                                  "contactExternalId": "john.smith@company.com",
                                  "firstName": "John", "plan": "Pro"})  # fmt: skip
    client.track("userId123", "Clicked Login Button", timestamp=_dt("2026-11-01T10:00:00.123Z"))
    commands = clean_sandbox.wait_commands(3)
    # Segment's clock correction moves the date by the time between the client's sentAt
    # and our receipt (the same clock here): milliseconds.
    event_date = _dt(commands[2].pop("eventDate").replace("Z", "+00:00"))
    assert abs(event_date - _dt("2026-11-01T10:00:00.123+00:00")).total_seconds() < 2
    assert commands == [
        {"appKey": APP_KEY, "accountExternalId": "12345678",
         "contactExternalId": "john.smith@company.com", "action": "setAttribute",
         "entity": "contact", "name": "FirstName", "value": "John"},
        {"appKey": APP_KEY, "accountExternalId": "12345678",
         "contactExternalId": "john.smith@company.com", "action": "setAttribute",
         "entity": "contact", "name": "plan", "value": "Pro"},
        {"appKey": APP_KEY, "accountExternalId": "12345678",
         "contactExternalId": "john.smith@company.com", "action": "trackEvent",
         "eventName": "Clicked Login Button", "quantity": 1},
    ]  # fmt: skip


def _dt(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text)


def test_track_before_identify_in_one_batch_and_filters(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    batch = [
        {"type": "track", "userId": "u9", "event": "Report Run",
         "timestamp": "2026-01-02T03:04:05Z",
         "properties": {"quantity": 3, "description": "monthly"}},
        {"type": "identify", "userId": "u9",
         "traits": {"accountExternalID": "acme", "contactExternalID": "ann@acme.io"}},
        {"type": "page", "userId": "u9", "name": "Home"},
        {"type": "track", "userId": "u9", "event": "Hidden", "integrations": {"ChurnZero": False}},
        {"type": "track", "userId": "u9", "event": "Also hidden",
         "integrations": {"Churnzero": False}},
        # All:false is Segment's router's business; on /webhook the event was routed to us.
        {"type": "track", "userId": "u9", "event": "Routed", "timestamp": "2026-01-02T03:04:06Z",
         "integrations": {"All": False, "Webhooks": True}},
    ]  # fmt: skip
    post_webhook(relay_url, batch)
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) >= 2)
    time.sleep(0.5)
    commands = clean_sandbox.commands()
    assert [(c["action"], c.get("eventName")) for c in commands] == [
        ("trackEvent", "Report Run"), ("trackEvent", "Routed")
    ]  # fmt: skip
    assert commands[0] | {"appKey": None} == {
        "appKey": None, "accountExternalId": "acme", "contactExternalId": "ann@acme.io",
        "action": "trackEvent", "eventName": "Report Run", "eventDate": "2026-01-02T03:04:05Z",
        "description": "monthly", "quantity": 3,
    }  # fmt: skip
    stats = {k.decode(): int(v) for k, v in r.hgetall("relay:stats").items()}
    assert stats["skipped:unsupported_type"] == 1
    assert stats["skipped:disabled_by_integrations"] == 2
    assert stats["skipped:nothing_to_send"] == 1  # the identify carried only ids
    assert stats["delivered"] == 2


def test_api_all_false_skips_and_engage_identify_via_webhook(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    auth = (WRITE_KEY, "")
    requests.post(relay_url + "/v1/identify", auth=auth, json={
        "userId": "<USER ID>", "traits": {"accountExternalId": "A1", "contactExternalId": "C1"},
    }).raise_for_status()  # fmt: skip
    requests.post(relay_url + "/v1/track", auth=auth, json={
        "userId": "<USER ID>", "event": "Not routed", "integrations": {"All": False},
    }).raise_for_status()  # fmt: skip
    wait_for(lambda: r.get("relay:identity:u:<USER ID>") is not None and settled(r))
    post_webhook(relay_url, fixture("engage-audience-identify-as-delivered.json"))
    commands = clean_sandbox.wait_commands(2)
    assert sorted((c["name"], c["value"]) for c in commands) == [
        ("Email", "dpease+test@drift.com"),
        ("eg_lcm_user_portal_roles_partial_access", True),
    ]
    assert {(c["accountExternalId"], c["contactExternalId"], c["entity"]) for c in commands} == {
        ("A1", "C1", "contact")
    }


def test_unresolved_track_waits_then_dead_letters(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # identity_wait is 4 s in the test environment.
    requests.post(relay_url + "/v1/track", auth=(WRITE_KEY, ""),
                  json={"userId": "ghost", "event": "Boo"}).raise_for_status()  # fmt: skip
    requests.post(relay_url + "/v1/track", auth=(WRITE_KEY, ""),
                  json={"userId": "late", "event": "Waited"}).raise_for_status()  # fmt: skip
    # Both tracks were tried and found no identity before "late" identifies.
    wait_for(lambda: int(r.hget("relay:stats", "retried:identity_wait") or 0) >= 2)
    requests.post(relay_url + "/v1/identify", auth=(WRITE_KEY, ""), json={
        "userId": "late", "traits": {"accountExternalId": "A", "contactExternalId": "C"}
    }).raise_for_status()  # fmt: skip
    commands = clean_sandbox.wait_commands(1)
    assert [c["eventName"] for c in commands] == ["Waited"]
    wait_for(lambda: r.zcard("relay:dlq:reason:unresolved_identity") == 1, timeout=15)
    entry = json.loads(next(iter(r.hvals("relay:dlq:entries"))))
    assert entry["item"]["event"]["userId"] == "ghost"
    assert entry["reason"] == "unresolved_identity"


def test_every_segment_sender_shape_reaches_churnzero(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    """The bodies Segment's senders post, each the way its sender posts it."""
    auth = (WRITE_KEY, "")
    for name in ("analytics-next-identify", "analytics-next-track"):
        # analytics.js: short paths, text/plain (no preflight), writeKey in the body.
        body = json.dumps(fixture(f"clients/{name}.json"))
        path = "/v1/i" if name.endswith("identify") else "/v1/t"
        answer = requests.post(relay_url + path, data=body, headers={"Content-Type": "text/plain"})
        assert answer.status_code == 200, answer.text
    requests.post(relay_url + "/v1/batch", json=fixture("clients/analytics-python-batch.json"))
    requests.post(
        relay_url + "/v1/batch", auth=auth, json=fixture("clients/analytics-node-batch.json")
    )
    post_webhook(relay_url, fixture("webhooks/single-track.json"))
    post_webhook(relay_url, fixture("webhooks/batched.json"))

    def tracked() -> list[tuple[str, str, str]]:
        return sorted((c["eventName"], c["accountExternalId"], c["contactExternalId"])
                      for c in clean_sandbox.commands() if c["action"] == "trackEvent")  # fmt: skip

    wait_for(lambda: len(tracked()) >= 5 and settled(r))
    assert tracked() == [
        ("Plan Upgraded", "acct-77", "ada@example.com"),
        ("Project Shared", "acct-55", "barbara@example.com"),
        ("Report Exported", "acct-77", "grace@example.com"),
        ("Seat Added", "acct-88", "alan@example.com"),
        ("Workspace Created", "acct-99", "linus@example.com"),
    ]
    names = {(c["contactExternalId"], c["name"], c["value"])
             for c in clean_sandbox.commands() if c["action"] == "setAttribute"}  # fmt: skip
    assert {("ada@example.com", "FirstName", "Ada"), ("grace@example.com", "LastName", "Hopper"),
            ("alan@example.com", "Email", "alan@example.com"),
            ("barbara@example.com", "LastName", "Liskov")} <= names  # fmt: skip
    assert r.hlen("relay:dlq:entries") == 0
