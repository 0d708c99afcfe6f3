"""`relay trace`: an event found by its messageId in each place it can be."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from relay.envelope import Envelope
from relay.state import trace
from tests.integration.conftest import WRITE_KEY, Sandbox, Starter, relay_cli, wait_for

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def send(url: str, *events: dict[str, Any]) -> None:
    requests.post(url + "/v1/batch", auth=AUTH, json={"batch": list(events)}).raise_for_status()


def states(r: redis.Redis, message_id: str) -> list[str]:
    return [s.state for s in trace.find(r, message_id)]


def test_trace_finds_an_event_in_each_state(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    url = start_ingest()
    send(url, {"type": "track", "userId": "u", "event": "Slow", "messageId": "m-1",
               "properties": IDS})  # fmt: skip
    [queued] = trace.find(r, "m-1")
    assert queued.state == "queued"
    assert queued.detail["queue"] == "relay"

    # ChurnZero answers slowly: the event is in flight while a worker waits on it.
    clean_sandbox.fault(latency_ms=3000)
    start_worker()
    wait_for(lambda: states(r, "m-1") == ["in_flight"])
    wait_for(lambda: states(r, "m-1") == ["delivered"])
    [delivered] = trace.find(r, "m-1")
    assert delivered.detail["commands"] == [
        {**IDS, "action": "trackEvent", "eventName": "Slow",
         "eventDate": delivered.detail["commands"][0]["eventDate"], "quantity": 1}
    ]  # fmt: skip

    # ChurnZero fails: the event waits in the delayed set, with the cause.
    clean_sandbox.fault(status=503, for_s=60)
    send(url, {"type": "track", "userId": "u", "event": "Later", "messageId": "m-2",
               "properties": IDS})  # fmt: skip
    # Retries come and go while ChurnZero fails: keep the very look that saw it delayed.
    seen: list[trace.Sighting] = []

    def delayed_now() -> bool:
        seen.extend(s for s in trace.find(r, "m-2") if s.state == "delayed")
        return bool(seen)

    wait_for(delayed_now)
    delayed = seen[0]
    assert delayed.detail["cause"] in ("5xx", "paused")
    assert delayed.at is not None
    clean_sandbox.reset()

    # Dead (an id ChurnZero would silently drop) and skipped (a page call).
    send(
        url,
        {"type": "track", "userId": "u", "event": "Bad", "messageId": "m-3",
         "properties": {"accountExternalId": "x" * 101, "contactExternalId": "C1"}},
        {"type": "page", "userId": "u", "messageId": "m-4"},
    )  # fmt: skip
    wait_for(lambda: states(r, "m-3") == ["dead"] and states(r, "m-4") == ["skipped"])
    [dead] = trace.find(r, "m-3")
    assert dead.detail["reason"] == "invalid_command"
    assert dead.detail["still_dead"] is True
    [skipped] = trace.find(r, "m-4")
    assert skipped.detail["reason"] == "unsupported_type"
    wait_for(lambda: "delivered" in states(r, "m-2"), timeout=30)

    # The CLI says the same, in words and as JSON; an unknown id is an error.
    text = relay_cli(r, "trace", "m-1")
    assert text.returncode == 0, text.stderr
    assert "delivered at" in text.stdout and '"eventName": "Slow"' in text.stdout
    assert "dead: invalid_command" in relay_cli(r, "trace", "m-3").stdout
    as_json = json.loads(relay_cli(r, "trace", "--json", "m-4").stdout)
    assert as_json[0]["state"] == "skipped"
    missing = relay_cli(r, "trace", "m-nowhere")
    assert missing.returncode != 0
    assert "is nowhere" in missing.stderr


def test_dead_letters_written_at_ingest_are_found(
    r: redis.Redis, start_ingest: Callable[..., str]
) -> None:
    url = start_ingest()
    send(url, {"type": "track", "userId": "u", "messageId": "m-invalid"})  # no event name
    [dead] = trace.find(r, "m-invalid")
    assert (dead.state, dead.detail["reason"]) == ("dead", "invalid_event")


def test_the_record_is_capped(r: redis.Redis) -> None:
    pipe = r.pipeline()
    items = [
        (Envelope.new({"messageId": f"m{i}"}, source="api", received_at=0.0, rid=f"r{i}"), [])
        for i in range(3000)
    ]
    trace.stage_record(pipe, 1000, delivered=items)
    pipe.execute()
    # A settlement larger than the record keeps its newest events, as many as the cap.
    assert recorded_events(r) == 1000
    assert states(r, "m2999") == ["delivered"]
    assert states(r, "m0") == []
    # Settlements of 10 events: the record holds the newest 100 settlements, 1000 events.
    for start in range(0, 3000, 10):
        trace.stage_record(pipe, 1000, delivered=items[start : start + 10])
    pipe.execute()
    assert recorded_events(r) == 1000
    assert states(r, "m2999") == ["delivered"]
    assert states(r, "m1999") == []


def recorded_events(r: redis.Redis) -> int:
    return sum(int(fields[b"n"]) for _, fields in r.xrange("relay:trace"))
