"""What Segment sends, accepted in full: Actions webhook batches of 1,000 and 4,000
signed events (PUT and PATCH too), oversized events dead-lettered instead of refused,
CORS for browsers, and identities that never borrow another user's anonymousId."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from tests.integration.conftest import WRITE_KEY, Sandbox, settled, sign, wait_for

pytestmark = pytest.mark.integration


def actions_event(run: str, n: int) -> dict[str, Any]:
    """An ordinary track as Segment's Actions webhook delivers it (about 920 bytes)."""
    return {
        "type": "track",
        "event": "Report Viewed",
        "userId": f"user-{n}",
        "anonymousId": str(uuid.UUID(int=n)),
        "messageId": f"{run}-{n}",
        "channel": "client",
        "timestamp": "2030-01-02T03:04:05.678Z",
        "originalTimestamp": "2030-01-02T03:04:05.111Z",
        "sentAt": "2030-01-02T03:04:05.200Z",
        "receivedAt": "2030-01-02T03:04:05.767Z",
        "properties": {
            "accountExternalId": f"acct-{n % 97}",
            "contactExternalId": f"user-{n}@example.com",
            "report": "Quarterly usage by seat",
            "description": "Viewed the quarterly usage report from the dashboard",
        },
        "context": {
            "ip": "203.0.113.7",
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "locale": "en-US",
            "page": {
                "path": "/reports/usage",
                "referrer": "https://app.example.com/dashboard",
                "title": "Usage report",
                "url": "https://app.example.com/reports/usage?period=quarter",
            },
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
            " Chrome/126.0.0.0 Safari/537.36",
        },
        "integrations": {},
        "projectId": "proj-7Vw3rSsyA2Xf",
        "version": 2,
        "writeKey": "REDACTED",
    }


def signed_batch(events: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """The array body and headers Segment sends: signed by the first element's bytes."""
    parts = [json.dumps(e, separators=(",", ":")).encode() for e in events]
    return b"[" + b",".join(parts) + b"]", {
        "X-Signature": sign(parts[0]),
        "Content-Type": "application/json",
    }


def delivered_commands(sandbox: Sandbox, count: int, timeout: float) -> int:
    """Wait until the sandbox accepted `count` commands (or the deadline); how many it has."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = int(requests.get(sandbox.url + "/_sandbox/stats", timeout=5).json()["commands"])
        if seen >= count:
            break
        time.sleep(0.2)
    return seen


@pytest.mark.parametrize(("count", "method"), [(1000, "POST"), (4000, "POST"), (1000, "PUT")])
def test_signed_actions_batch_is_answered_200_and_delivered_in_full(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox, count: int, method: str
) -> None:
    run = uuid.uuid4().hex[:8]
    body, headers = signed_batch([actions_event(run, n) for n in range(count)])
    assert len(body) > 500 * 1024  # over the tracking API's request limit
    started = time.perf_counter()
    answer = requests.request(
        method, relay_url + "/webhook", data=body, headers=headers, timeout=30
    )
    took = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"success": True}
    assert delivered_commands(clean_sandbox, count, timeout=120) == count
    all_in = time.perf_counter() - started
    print(f"\n{count} events, {len(body) / 1e6:.2f} MB via {method}: answered in {took:.2f} s,"
          f" all in the sandbox after {all_in:.1f} s")  # fmt: skip
    commands = clean_sandbox.commands()
    assert sorted(c["contactExternalId"] for c in commands) == sorted(
        f"user-{n}@example.com" for n in range(count)
    )
    assert {c["eventName"] for c in commands} == {"Report Viewed"}
    # ChurnZero has the commands before the worker settles (and counts) their batch.
    wait_for(lambda: settled(r))
    assert int(r.hget("relay:stats", "delivered") or 0) == count


def test_patch_webhook_and_gzip_batch_over_500kb(
    relay_url: str, clean_sandbox: Sandbox, r: redis.Redis
) -> None:
    import gzip

    run = uuid.uuid4().hex[:8]
    body, headers = signed_batch([actions_event(run, n) for n in range(800)])
    # Segment signs what it sends: the gzip bytes.
    packed = gzip.compress(body)
    headers = {**headers, "Content-Encoding": "gzip", "X-Signature": sign(packed)}
    answer = requests.patch(relay_url + "/webhook", data=packed, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert delivered_commands(clean_sandbox, 800, timeout=60) == 800


def test_oversized_or_invalid_events_of_an_authenticated_delivery_are_dead_lettered(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    run = uuid.uuid4().hex[:8]
    huge = actions_event(run, 1)
    huge["properties"]["blob"] = "x" * (70 * 1024)
    body, headers = signed_batch([actions_event(run, 0), huge, actions_event(run, 2)])
    answer = requests.post(relay_url + "/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rejected"] == [
        {"index": 1, "errors": [{"field": "event", "message": "larger than 64 KB"}]}
    ]
    # A lone invalid event too: Segment drops a 400, the dead-letter queue keeps it.
    lone = json.dumps({"type": "track", "userId": "u1", "messageId": f"{run}-lone"}).encode()
    answer = requests.put(relay_url + "/webhook", data=lone, headers={"X-Signature": sign(lone)})
    assert answer.status_code == 200, answer.text
    assert delivered_commands(clean_sandbox, 2, timeout=30) == 2
    assert r.zcard("relay:dlq:reason:invalid_event") == 2
    kept = [json.loads(v) for v in r.hvals("relay:dlq:entries")]
    assert sorted(e["item"]["event"]["messageId"] for e in kept) == [f"{run}-1", f"{run}-lone"]


def test_unsigned_big_batch_is_still_refused(relay_url: str, r: redis.Redis) -> None:
    body, _ = signed_batch([actions_event("x", n) for n in range(1000)])
    answer = requests.post(relay_url + "/webhook", data=body, headers={"X-Signature": "0" * 40})
    assert answer.status_code == 401
    assert r.llen("relay") == 0


def test_webhook_over_its_own_limits_is_a_bad_request(relay_url: str, r: redis.Redis) -> None:
    body, headers = signed_batch([{"type": "track", "userId": "u", "event": "e"}] * 8001)
    answer = requests.post(relay_url + "/webhook", data=body, headers=headers, timeout=30)
    assert answer.status_code == 400 and "8000" in answer.json()["error"]
    assert r.llen("relay") == 0


# --- browsers: CORS on /v1/* ------------------------------------------------------------


def preflight(url: str, origin: str) -> requests.Response:
    return requests.options(url, headers={
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }, timeout=5)  # fmt: skip


def test_preflight_and_cors_headers_on_the_tracking_api(
    r: redis.Redis, start_ingest: Callable[..., str]
) -> None:
    ingest = start_ingest()
    answer = preflight(ingest + "/v1/t", "https://app.example.com")
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    event = {"userId": "u1", "event": "Clicked", "writeKey": WRITE_KEY}
    posted = requests.post(ingest + "/v1/t", data=json.dumps(event),
                           headers={"Origin": "https://app.example.com",
                                    "Content-Type": "text/plain"})  # fmt: skip
    assert posted.status_code == 200
    assert posted.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    # Errors carry the headers too, so the page's script can read why.
    refused = requests.post(ingest + "/v1/t", data=b"{}", headers={"Origin": "https://x.io"})
    assert refused.status_code in (400, 401)
    assert refused.headers["Access-Control-Allow-Origin"] == "https://x.io"
    assert preflight(ingest + "/v1/nope", "https://x.io").status_code == 404


def test_cors_origins_setting_narrows_who_may_call(
    r: redis.Redis, start_ingest: Callable[..., str]
) -> None:
    ingest = start_ingest(cors_origins="https://app.example.com")
    assert preflight(ingest + "/v1/batch", "https://app.example.com").status_code == 204
    other = preflight(ingest + "/v1/batch", "https://evil.example")
    assert other.status_code == 403
    assert "Access-Control-Allow-Origin" not in other.headers


# --- identity: one user, one contact ----------------------------------------------------


def test_unknown_user_on_a_shared_browser_waits_for_their_own_identify(
    relay_url: str, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    auth = (WRITE_KEY, "")
    shared = "anon-shared-browser"
    requests.post(relay_url + "/v1/identify", auth=auth, json={
        "userId": "alice", "anonymousId": shared,
        "traits": {"accountExternalId": "acct-a", "contactExternalId": "alice@a.io"},
    }).raise_for_status()  # fmt: skip
    deadline = time.monotonic() + 20
    while r.get("relay:identity:a:" + shared) is None:
        assert time.monotonic() < deadline, "alice's identify was never learned"
        time.sleep(0.1)
    requests.post(relay_url + "/v1/track", auth=auth, json={
        "userId": "bob", "anonymousId": shared, "event": "Opened Report",
    }).raise_for_status()  # fmt: skip
    deadline = time.monotonic() + 20
    while int(r.hget("relay:stats", "retried:identity_wait") or 0) == 0:
        assert time.monotonic() < deadline, "bob's track did not wait for his identify"
        time.sleep(0.1)
    requests.post(relay_url + "/v1/identify", auth=auth, json={
        "userId": "bob", "anonymousId": shared,
        "traits": {"accountExternalId": "acct-b", "contactExternalId": "bob@b.io"},
    }).raise_for_status()  # fmt: skip
    commands = clean_sandbox.wait_commands(1)
    tracks = [c for c in commands if c["action"] == "trackEvent"]
    assert [(c["accountExternalId"], c["contactExternalId"]) for c in tracks] == [
        ("acct-b", "bob@b.io")
    ]
