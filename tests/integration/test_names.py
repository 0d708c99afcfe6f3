"""The guard on new ChurnZero names: counted and listed, or held until allowed."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis
import requests

from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    Starter,
    metric,
    relay_cli,
    settled,
    wait_for,
)

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def send(url: str, *events: dict[str, object]) -> None:
    requests.post(url + "/v1/batch", auth=AUTH, json={"batch": list(events)}).raise_for_status()


def status(r: redis.Redis) -> dict[str, object]:
    out = relay_cli(r, "status", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_new_names_are_counted_once_and_listed(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    url = start_ingest()
    start_worker()
    events = (
        {"type": "identify", "userId": "u", "traits": {**IDS, "plan": "pro"}},
        {"type": "track", "userId": "u", "event": "Signed Up"},
    )
    send(url, *events)
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 2)
    send(url, *events)  # the same names again: not new any more
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 4)

    text = requests.get(url + "/metrics").text
    assert metric(text, "relay_new_names_total", kind="event") == 1
    assert metric(text, "relay_new_names_total", kind="contact_attribute") == 1
    names = status(r)["names"]
    assert isinstance(names, dict)
    assert {(n["kind"], n["name"]) for n in names["new"]} == {
        ("event", "Signed Up"), ("contact_attribute", "plan"),
    }  # fmt: skip
    assert names["known"] == {"event": 1, "account_attribute": 0, "contact_attribute": 1}
    assert names["held"] == []


def test_hold_mode_dead_letters_a_new_name_until_allowed(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    assert relay_cli(r, "names", "allow", "Report Run", "--kind", "event").returncode == 0
    url = start_ingest()
    start_worker(new_names="hold")
    send(
        url,
        {"type": "track", "userId": "u", "event": "Report Run", "properties": IDS},
        {"type": "track", "userId": "u", "event": "Reprot Run", "properties": IDS},  # a typo
    )
    wait_for(lambda: settled(r) and r.zcard("relay:dlq:reason:new_name") == 1)
    assert [c["eventName"] for c in clean_sandbox.commands()] == ["Report Run"]
    [line] = relay_cli(r, "dlq", "list", "--json").stdout.splitlines()
    entry = json.loads(line)
    assert entry["reason"] == "new_name"
    assert entry["errors"] == ["new event name: Reprot Run"]
    names = status(r)["names"]
    assert isinstance(names, dict)
    assert [(n["kind"], n["name"]) for n in names["held"]] == [("event", "Reprot Run")]
    text = requests.get(url + "/metrics").text
    assert metric(text, "relay_new_names_total", kind="event") == 1

    # The preview and the dry run say the same as the worker did.
    dry = relay_cli(
        r, "dlq", "replay", "--reason", "new_name", "--dry-run", "--json", new_names="hold"
    )
    assert json.loads(dry.stdout)["outcomes"] == {"dead: new_name": 1}

    allowed = relay_cli(r, "names", "allow", "Reprot Run")
    assert allowed.returncode == 0, allowed.stderr
    assert "event" in allowed.stdout
    assert status(r)["names"]["held"] == []  # type: ignore[index]
    dry = relay_cli(
        r, "dlq", "replay", "--reason", "new_name", "--dry-run", "--json", new_names="hold"
    )
    assert json.loads(dry.stdout)["outcomes"] == {"deliver": 1}
    assert relay_cli(r, "dlq", "replay", "--reason", "new_name").returncode == 0
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 2)
    assert [c["eventName"] for c in clean_sandbox.commands()] == ["Report Run", "Reprot Run"]
    assert r.zcard("relay:dlq:index") == 0

    not_held = relay_cli(r, "names", "allow", "Never Seen")
    assert not_held.returncode != 0
    assert "not held" in not_held.stderr
