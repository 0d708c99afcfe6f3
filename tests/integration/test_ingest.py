"""Ingest against a real Redis: what lands in the `relay` queue, and what does not."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
import requests
import segment.analytics as analytics_module
from segment.analytics import Client

from tests import procs
from tests.conftest import fixture
from tests.integration.conftest import WRITE_KEY, queued_items, relay_env, sign

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ingest(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ingest process for the module: what a test checks is in Redis (the queue, dead
    letters), which `r` empties before each test."""
    children = procs.Children(tmp_path_factory.mktemp("ingest"))
    try:
        yield procs.start_ingest(children, relay_env(redis_url)).url
    finally:
        children.stop_all()


def test_real_analytics_python_client_lands_in_queue(ingest: str, r: redis.Redis) -> None:
    errors: list[Exception] = []
    client = Client(
        WRITE_KEY, host=ingest, gzip=True, sync_mode=True, on_error=lambda e, _: errors.append(e)
    )
    client.identify("userId123", {"accountExternalId": "12345678",
                                  "contactExternalId": "john.smith@company.com"})  # fmt: skip
    client.track("userId123", "Clicked Login Button", {"quantity": 2})
    client.flush()
    assert errors == []
    items = queued_items(r)
    assert [i["event"]["type"] for i in items] == ["identify", "track"]
    track = items[1]
    assert track["event"]["event"] == "Clicked Login Button"
    assert track["event"]["userId"] == "userId123"
    assert track["source"] == "api"
    assert track["event"]["context"]["library"]["name"] == "analytics-python"
    assert "writeKey" not in track["event"]
    assert int(r.get("relay:depth:ready")) == 2
    assert analytics_module.VERSION


def test_signed_webhook_single_and_batched(ingest: str, r: redis.Redis) -> None:
    one = json.dumps({"type": "track", "userId": "u1", "event": "Signed Up ✓"}).encode()
    answer = requests.post(ingest + "/webhook", data=one, headers={"x-signature": sign(one)})
    assert answer.status_code == 200, answer.text
    first = b'{"type": "identify", "userId": "u2", "traits": {"plan": "pro", "mrr": 1.10}}'
    batch = b"[ " + first + b' ,{"type":"track","userId":"u2","event":"X"}]'
    answer = requests.post(ingest + "/webhook", data=batch, headers={"X-Signature": sign(first)})
    assert answer.status_code == 200, answer.text
    events = [i["event"] for i in queued_items(r)]
    assert [(e["type"], e["userId"]) for e in events] == [
        ("track", "u1"), ("identify", "u2"), ("track", "u2")
    ]  # fmt: skip
    assert all(i["source"] == "webhook" for i in queued_items(r))


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    [
        ("/webhook", b'{"type":"track","userId":"u","event":"e"}', {"X-Signature": "00"}, 401),
        ("/webhook", b'{"type":"track","userId":"u","event":"e"}', {}, 401),
        ("/v1/track", b'{"userId":"u","event":"e","writeKey":"wrong"}', {}, 401),
        ("/v1/track", b'{"userId":"u","event":"e"}', {}, 401),
        ("/v1/track", b"not json", {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"}, 400),
        ("/v1/track", b'{"userId":"u"}', {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"}, 400),
        ("/v1/batch", b'{"batch": {}}', {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"}, 400),
        ("/v1/nope", b"{}", {}, 404),
    ],
)
def test_rejected_requests_leave_nothing(
    ingest: str, r: redis.Redis, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    answer = requests.post(ingest + path, data=body, headers=headers)
    assert answer.status_code == status
    if status == 400:
        assert answer.json()["error"]
    assert r.llen("relay") == 0
    assert r.hlen("relay:dlq:entries") == 0


def test_batch_with_invalid_events_accepts_the_rest(ingest: str, r: redis.Redis) -> None:
    body = {
        "writeKey": WRITE_KEY,
        "context": {"library": {"name": "analytics.js"}},
        "batch": [
            {"type": "track", "userId": "u", "event": "Good"},
            {"type": "track", "userId": "u"},
            {"type": "identify"},
        ],
    }
    answer = requests.post(
        ingest + "/v1/b", data=json.dumps(body), headers={"Content-Type": "text/plain"}
    )
    assert answer.status_code == 200
    result = answer.json()
    assert result["accepted"] == 1
    assert [x["index"] for x in result["rejected"]] == [1, 2]
    assert result["rejected"][0]["errors"] == [{"field": "event", "message": "Field required"}]
    assert [i["event"]["event"] for i in queued_items(r)] == ["Good"]
    assert queued_items(r)[0]["event"]["context"]["library"]["name"] == "analytics.js"
    assert r.zcard("relay:dlq:reason:invalid_event") == 2


def test_gzip_and_limits(ingest: str, r: redis.Redis) -> None:
    auth = ("test-write-key", "")
    event = {"userId": "u", "event": "Big", "properties": {"blob": "x" * 40_000}}
    answer = requests.post(ingest + "/v1/track", json=event, auth=auth)
    assert answer.status_code == 400 and "32 KB" in answer.json()["error"]
    # Older analytics-python reads `code` and `message` of an error answer.
    assert answer.json()["code"] == "invalid_request"
    assert answer.json()["message"] == answer.json()["error"]
    bomb = gzip.compress(b'{"batch": [' + b" " * 20_000_000 + b"]}")
    answer = requests.post(
        ingest + "/v1/batch", data=bomb, auth=auth, headers={"Content-Encoding": "gzip"}
    )
    assert answer.status_code == 400 and "decompressed" in answer.json()["error"]
    big = {"batch": [{"type": "track", "userId": "u", "event": "e"}] * 2501}
    answer = requests.post(ingest + "/v1/batch", json=big, auth=auth)
    assert answer.status_code == 400 and "2500" in answer.json()["error"]
    assert r.llen("relay") == 0
    ok = gzip.compress(
        json.dumps({"batch": [{"type": "track", "userId": 42, "event": "e"}]}).encode()
    )
    answer = requests.post(
        ingest + "/v1/import", data=ok, auth=auth, headers={"Content-Encoding": "gzip"}
    )
    assert answer.status_code == 200
    assert queued_items(r)[0]["event"]["userId"] == "42"


def test_analytics_go_fixtures_through_batch(ingest: str, r: redis.Redis) -> None:
    for name in ("test-timestamp-track.json", "test-context-track.json",
                 "test-integrations-track.json", "test-enqueue-identify.json"):  # fmt: skip
        body = fixture(f"analytics-go/{name}")
        answer = requests.post(ingest + "/v1/batch", json=body, auth=(WRITE_KEY, ""))
        assert answer.status_code == 200, (name, answer.text)
    events = [i["event"] for i in queued_items(r)]
    assert len(events) == 4
    # Epoch ms read as such; the fixture's sentAt (2009) is 5 years before its timestamp,
    # so Segment's clock correction puts the event 5 years after its receipt.
    assert events[0]["originalTimestamp"] == 1436569200000
    received = datetime.fromtimestamp(queued_items(r)[0]["received_at"], UTC)
    stamp = datetime.fromisoformat(events[0]["timestamp"])
    skew = datetime(2009, 11, 10, 23, tzinfo=UTC) - datetime(2015, 7, 10, 23, tzinfo=UTC)
    assert abs(stamp - (received - skew)) < timedelta(seconds=1)
    assert events[1]["context"] == {"library": {"name": "journify-go-sdk", "version": "3.0.0"},
                                    "whatever": "here"}  # fmt: skip
    assert events[2]["integrations"]["Intercom"] is False


def test_over_high_water_mark_answers_503(r: redis.Redis, start_ingest: Callable[..., str]) -> None:
    url = start_ingest(max_queue_depth=5)
    r.set("relay:depth:ready", 10)
    r.rpush("relay", b"placeholder")  # a non-empty queue, so the counter is believed
    # The admission check refreshes every 250 ms: wait for it to see the depth, however
    # long that takes.
    deadline = time.monotonic() + 10
    while requests.get(url + "/readyz").status_code != 503:
        assert time.monotonic() < deadline, "the admission check never saw the depth"
        time.sleep(0.1)
    answer = requests.post(
        url + "/v1/track", json={"userId": "u", "event": "e"}, auth=(WRITE_KEY, "")
    )
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]
    assert r.llen("relay") == 1


def test_a_batch_sent_again_dead_letters_its_invalid_events_once(
    ingest: str, r: redis.Redis
) -> None:
    # Segment sends a batch again after a 503 or a lost answer: same events, same ids.
    body = {"batch": [{"type": "track", "userId": "u", "event": "Good", "messageId": "g1"},
                      {"type": "track", "userId": "u", "messageId": "bad-1"}]}  # fmt: skip
    for _ in range(2):
        answer = requests.post(ingest + "/v1/batch", json=body, auth=(WRITE_KEY, ""))
        assert answer.status_code == 200 and len(answer.json()["rejected"]) == 1
    assert r.zcard("relay:dlq:reason:invalid_event") == 1
    [entry] = [json.loads(v) for v in r.hvals("relay:dlq:entries")]
    assert entry["item"]["event"]["messageId"] == "bad-1"
