"""relay.envelope: the queue item's JSON is a contract between relay versions.

The messages in tests/fixtures/wire were queued by an earlier relay; every envelope in
them decodes, and encodes again to the same bytes (a null optional field aside), so
either side of an upgrade reads what the other wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from relay import envelope, wire
from relay.envelope import Envelope
from relay.errors import DecodeError
from tests.conftest import ROOT

WIRE = ROOT / "tests" / "fixtures" / "wire"
OLD = sorted(WIRE.glob("*.jsonl"))
EVENT = {"type": "track", "userId": "u1", "event": "Login", "messageId": "m-1"}


def old_messages(*paths: Path) -> list[bytes]:
    return [raw for path in paths or OLD for raw in path.read_bytes().splitlines()]


def test_every_writer_of_the_earlier_relay_is_in_the_fixtures() -> None:
    names = {path.stem for path in OLD}
    assert {"ingest-pipelined", "ingest-celery", "mover-retry", "replay"} <= names


@pytest.mark.parametrize("raw", old_messages())
def test_old_envelopes_decode_and_encode_to_the_same_bytes(raw: bytes) -> None:
    items = wire.items_of(json.loads(raw))
    assert items
    for item in items:
        decoded = Envelope.from_dict(item)
        assert decoded.id == item["id"] and decoded.event == item["event"]
        written = {k: v for k, v in item.items() if v is not None}  # a replay wrote a null
        assert decoded.to_json() == orjson.dumps(written)


def test_ingest_writes_the_message_body_the_earlier_relay_wrote() -> None:
    [raw] = old_messages(WIRE / "ingest-pipelined.jsonl")
    old = json.loads(raw)
    items = [Envelope.from_dict(item).to_dict() for item in wire.items_of(old)]
    ours = json.loads(wire.MessageWriter().encode(items, old["headers"]["id"]))
    assert wire.body_of(ours) == wire.body_of(old)  # ours compressed, theirs not


def test_fresh_envelopes_are_what_new_makes() -> None:
    [fresh] = envelope.fresh([EVENT], "webhook", 1.5, lambda: "r1")
    made = Envelope.new(EVENT, source="webhook", received_at=1.5, rid="r1")
    assert orjson.dumps(fresh) == made.to_json()
    assert list(fresh) == ["id", "source", "received_at", "attempts", "event"]


def test_new_gives_a_relay_id_of_its_own() -> None:
    one, other = (Envelope.new(EVENT, source="api", received_at=1.0) for _ in range(2))
    assert one.id and one.id != other.id


def test_an_attempt_counts_and_keeps_the_first_failure() -> None:
    queued = Envelope.new(EVENT, source="api", received_at=1.0, rid="r1")
    once = queued.attempted(10.0)
    twice = once.attempted(20.0)
    assert (once.attempts, once.first_failure) == (1, 10.0)
    assert (twice.attempts, twice.first_failure) == (2, 10.0)
    assert queued.attempts == 0 and queued.first_failure is None  # values, not changed


def test_a_replay_starts_afresh_from_its_entry() -> None:
    tried = Envelope(id="r1", source="api", received_at=1.0, attempts=4, event=EVENT,
                     first_seen=2.0, first_failure=3.0)  # fmt: skip
    again = tried.replayed("entry-1", 100.0)
    assert (again.id, again.event, again.received_at, again.attempts) == ("r1", EVENT, 100.0, 0)
    assert again.first_seen is None and again.first_failure is None
    assert again.replayed_from == "entry-1"
    assert list(again.to_dict()) == [
        "id", "source", "received_at", "attempts", "event", "replayed_from",
    ]  # fmt: skip


def test_absent_or_null_optional_fields_and_unknown_keys() -> None:
    item = {"id": "r1", "event": EVENT, "first_failure": None, "from_a_later_version": 1}
    decoded = Envelope.from_dict(item)
    assert decoded == Envelope(id="r1", source="api", received_at=None, event=EVENT)
    assert decoded.to_dict() == {"id": "r1", "source": "api", "attempts": 0, "event": EVENT}


def test_json_text_round_trips() -> None:
    tried = Envelope.new(EVENT, source="api", received_at=1.25, rid="r1").attempted(2)
    assert Envelope.from_json(tried.to_json()) == tried
    assert Envelope.from_json(tried.to_json().decode()) == tried


def test_the_message_id_is_the_events_when_it_has_one() -> None:
    def of(event: dict[str, Any]) -> str | None:
        return Envelope.new(event, source="api", received_at=0.0).message_id

    assert of(EVENT) == "m-1"
    assert of({"type": "track"}) is None
    assert of({"messageId": ""}) is None and of({"messageId": 7}) is None


BAD = {
    "not an object": ([EVENT], "an envelope is a JSON object, not list"),
    "no id": ({"event": EVENT}, "no relay id"),
    "a number for an id": ({"id": 7, "event": EVENT}, "no relay id"),
    "no event": ({"id": "r1"}, "r1: event is not a JSON object but NoneType"),
    "an event that is no object": ({"id": "r1", "event": "x"}, "event is not a JSON object"),
    "a number for a source": ({"id": "r1", "event": EVENT, "source": 1}, "r1: source is 1"),
    "a flag for attempts": ({"id": "r1", "event": EVENT, "attempts": True}, "attempts is True"),
    "text for attempts": ({"id": "r1", "event": EVENT, "attempts": "2"}, "attempts is '2'"),
    "text for a time": ({"id": "r1", "event": EVENT, "received_at": "now"}, "received_at is"),
    "a number for the entry": ({"id": "r1", "event": EVENT, "replayed_from": 3}, "replayed_from"),
}


@pytest.mark.parametrize(("item", "why"), BAD.values(), ids=BAD.keys())
def test_what_is_not_an_envelope_raises_decode_error(item: Any, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        Envelope.from_dict(item)


def test_what_is_not_json_raises_decode_error() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        Envelope.from_json(b"{")


def test_decode_all_keeps_what_is_not_an_envelope_apart() -> None:
    good = Envelope.new(EVENT, source="api", received_at=0.0, rid="r1")
    envelopes, failed = envelope.decode_all([good.to_dict(), {"event": EVENT}, "x"])
    assert envelopes == [good]
    assert [item for item, _ in failed] == [{"event": EVENT}, "x"]
    assert all(isinstance(exc, DecodeError) for _, exc in failed)
