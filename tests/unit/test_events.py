"""relay.events: lenient parsing of Segment events and the form the relay stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from relay import events

RECEIVED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def track(**extra: Any) -> dict[str, Any]:
    return {"type": "track", "event": "Clicked Login Button", "userId": "u1", **extra}


def identify(**extra: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": "u1", "traits": {}, **extra}


def stored(raw: dict[str, Any]) -> dict[str, Any]:
    return events.normalized(raw, events.parse(raw), RECEIVED)


# --- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "instant", "stored_as"),
    [
        pytest.param(
            "2024-05-03T19:42:50.066Z",
            datetime(2024, 5, 3, 19, 42, 50, 66000, tzinfo=UTC),
            "2024-05-03T19:42:50.066000Z",
            id="milliseconds",
        ),
        pytest.param(
            "2024-05-03T19:42:50.066179Z",
            datetime(2024, 5, 3, 19, 42, 50, 66179, tzinfo=UTC),
            "2024-05-03T19:42:50.066179Z",
            id="microseconds",
        ),
        pytest.param(
            # As in Segment's originalTimestamp: nanoseconds; Python keeps microseconds.
            "2024-05-03T19:42:50.066179717Z",
            datetime(2024, 5, 3, 19, 42, 50, 66179, tzinfo=UTC),
            "2024-05-03T19:42:50.066179Z",
            id="nanoseconds",
        ),
        pytest.param(
            "2024-05-03T21:42:50.066+02:00",
            datetime(2024, 5, 3, 19, 42, 50, 66000, tzinfo=UTC),
            "2024-05-03T19:42:50.066000Z",
            id="positive-offset",
        ),
        pytest.param(
            "2024-05-03T14:42:50-05:00",
            datetime(2024, 5, 3, 19, 42, 50, tzinfo=UTC),
            "2024-05-03T19:42:50Z",
            id="negative-offset",
        ),
        pytest.param(
            "2024-05-03T00:30:00+05:30",
            datetime(2024, 5, 2, 19, 0, tzinfo=UTC),
            "2024-05-02T19:00:00Z",
            id="offset-crosses-midnight",
        ),
        pytest.param(
            # analytics-go fixtures: epoch milliseconds as a JSON number.
            1257894000000,
            datetime(2009, 11, 10, 23, 0, tzinfo=UTC),
            "2009-11-10T23:00:00Z",
            id="epoch-milliseconds",
        ),
        pytest.param(
            1436569200000,
            datetime(2015, 7, 10, 23, 0, tzinfo=UTC),
            "2015-07-10T23:00:00Z",
            id="epoch-milliseconds-2015",
        ),
        pytest.param(
            "2024-05-03T19:42:50",
            datetime(2024, 5, 3, 19, 42, 50, tzinfo=UTC),
            "2024-05-03T19:42:50Z",
            id="naive-is-utc",
        ),
    ],
)
def test_timestamps_are_read_leniently_and_stored_as_utc(
    given: Any, instant: datetime, stored_as: str
) -> None:
    event = events.parse(track(timestamp=given))
    assert event.timestamp == instant
    assert event.timestamp is not None and event.timestamp.utcoffset() == timedelta(0)
    assert events.normalized(track(timestamp=given), event, RECEIVED)["timestamp"] == stored_as


def test_offset_timestamp_is_the_same_instant_not_the_same_wall_clock() -> None:
    event = events.parse(track(timestamp="2024-01-01T12:00:00+09:00"))
    tokyo = timezone(timedelta(hours=9))
    assert event.timestamp == datetime(2024, 1, 1, 12, 0, tzinfo=tokyo)
    assert event.timestamp is not None and event.timestamp.hour == 3


def test_missing_timestamp_is_filled_from_receipt() -> None:
    assert stored(track())["timestamp"] == "2030-01-02T03:04:05Z"
    assert stored(track(timestamp=None))["timestamp"] == "2030-01-02T03:04:05Z"


def test_unreadable_timestamp_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        events.parse(track(timestamp="last tuesday"))
    assert any(e["loc"][-1] == "timestamp" for e in info.value.errors())


# --- ids --------------------------------------------------------------------------------


def test_numeric_ids_become_strings() -> None:
    raw = track(userId=123456, anonymousId=42, messageId=7)
    event = events.parse(raw)
    assert (event.userId, event.anonymousId, event.messageId) == ("123456", "42", "7")
    out = events.normalized(raw, event, RECEIVED)
    assert (out["userId"], out["anonymousId"], out["messageId"]) == ("123456", "42", "7")


def test_large_numeric_user_id_keeps_every_digit() -> None:
    assert events.parse(track(userId=9007199254740993)).userId == "9007199254740993"


@pytest.mark.parametrize("blank", ["", "   ", "\t", None])
def test_blank_user_id_is_missing_and_not_stored(blank: Any) -> None:
    raw = identify(userId=blank, anonymousId="anon-1")
    event = events.parse(raw)
    assert event.userId is None
    out = events.normalized(raw, event, RECEIVED)
    assert "userId" not in out
    assert out["anonymousId"] == "anon-1"


def test_blank_message_id_is_dropped() -> None:
    assert "messageId" not in stored(track(messageId=""))


@pytest.mark.parametrize("kind", ["identify", "track"])
@pytest.mark.parametrize(
    "ids",
    [
        pytest.param({}, id="none"),
        pytest.param({"userId": "", "anonymousId": ""}, id="both-empty"),
        pytest.param({"userId": "  ", "anonymousId": None}, id="blank-and-null"),
    ],
)
def test_identify_and_track_need_a_user_id_or_anonymous_id(kind: str, ids: dict[str, Any]) -> None:
    raw = {"type": kind, "event": "Signed Up", **ids}
    with pytest.raises(ValidationError, match="userId or anonymousId is required"):
        events.parse(raw)


@pytest.mark.parametrize("kind", ["identify", "track"])
def test_anonymous_id_alone_is_enough(kind: str) -> None:
    event = events.parse({"type": kind, "event": "Signed Up", "anonymousId": "anon-1"})
    assert event.anonymousId == "anon-1"
    assert event.userId is None


def test_page_without_ids_is_accepted() -> None:
    # Only identify and track are delivered, so only they need someone to attribute to.
    assert events.parse({"type": "page", "name": "Home"}).type == "page"


# --- track needs an event name ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"type": "track", "userId": "u1"}, id="missing"),
        pytest.param({"type": "track", "userId": "u1", "event": ""}, id="empty"),
        pytest.param({"type": "track", "userId": "u1", "event": None}, id="null"),
    ],
)
def test_track_needs_an_event(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        events.parse(raw)
    assert [e["loc"][-1] for e in info.value.errors()] == ["event"]


# --- type -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("track", "track"), ("Track", "track"), ("TRACK", "track"), ("Identify", "identify")],
)
def test_type_is_case_insensitive(given: str, expected: str) -> None:
    raw = {"type": given, "userId": "u1", "event": "Clicked"}
    event = events.parse(raw)
    assert event.type == expected
    assert events.normalized(raw, event, RECEIVED)["type"] == expected


def test_case_insensitive_type_does_not_change_the_callers_dict() -> None:
    raw = {"type": "Track", "userId": "u1", "event": "Clicked"}
    events.parse(raw)
    assert raw["type"] == "Track"


@pytest.mark.parametrize("kind", ["page", "screen", "group", "alias", "delete"])
def test_other_segment_types_are_accepted(kind: str) -> None:
    assert events.parse({"type": kind, "userId": "u1"}).type == kind


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"type": "purchase", "userId": "u1"}, id="unknown"),
        pytest.param({"type": 5, "userId": "u1"}, id="number"),
        pytest.param({"userId": "u1", "event": "Clicked"}, id="missing"),
    ],
)
def test_unknown_or_missing_type_is_rejected(raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        events.parse(raw)


def test_parsed_kind_matches_type() -> None:
    assert isinstance(events.parse(identify()), events.Identify)
    assert isinstance(events.parse(track()), events.Track)


# --- version, unknown keys, free-form bags ----------------------------------------------


@pytest.mark.parametrize("version", [1, 2, "1.1", "2", None, {"major": 2}])
def test_version_of_any_type_is_accepted_and_kept(version: Any) -> None:
    out = stored(track(version=version))
    assert out["version"] == version


def test_unknown_keys_are_kept_as_sent() -> None:
    raw = track(
        originalTimestamp="2024-05-03T19:42:50.066179717Z",
        receivedAt="2024-05-03T19:42:59.762Z",
        sentAt=None,
        channel="server",
        _metadata={"bundled": ["Segment.io"]},
    )
    out = stored(raw)
    assert out["originalTimestamp"] == "2024-05-03T19:42:50.066179717Z"
    assert out["receivedAt"] == "2024-05-03T19:42:59.762Z"
    assert out["sentAt"] is None
    assert out["channel"] == "server"
    assert out["_metadata"] == {"bundled": ["Segment.io"]}
    assert out["event"] == "Clicked Login Button"


def test_normalized_does_not_change_the_raw_event() -> None:
    raw = track(userId=5, timestamp=1257894000000)
    stored(raw)
    assert raw["userId"] == 5
    assert raw["timestamp"] == 1257894000000


@pytest.mark.parametrize("key", ["context", "integrations"])
def test_null_context_and_integrations_read_as_empty(key: str) -> None:
    event = events.parse(track(**{key: None}))
    assert getattr(event, key) == {}


def test_null_traits_and_properties_read_as_empty() -> None:
    identify_event = events.parse(identify(traits=None))
    track_event = events.parse(track(properties=None))
    assert isinstance(identify_event, events.Identify) and identify_event.traits == {}
    assert isinstance(track_event, events.Track) and track_event.properties == {}


def test_traits_keep_their_values_unchanged() -> None:
    traits = {"plan": "pro", "seats": 3, "admin": True, "tags": ["a", "b"], "x": {"y": 1}}
    event = events.parse(identify(traits=traits))
    assert isinstance(event, events.Identify)
    assert event.traits == traits


def test_traits_must_be_an_object() -> None:
    with pytest.raises(ValidationError) as info:
        events.parse(identify(traits="pro"))
    assert [e["loc"][-1] for e in info.value.errors()] == ["traits"]


def test_unknown_keys_are_kept_in_the_stored_event_not_read_by_the_model() -> None:
    raw = track(sentAt="2030-01-02T03:04:00Z", receivedAt="2030-01-02T03:04:01Z", custom={"a": 1})
    event = events.parse(raw)
    assert not hasattr(event, "custom") and event.model_extra is None
    out = events.normalized(raw, event, RECEIVED)
    assert out["custom"] == {"a": 1} and out["sentAt"] == raw["sentAt"]
    assert out["receivedAt"] == raw["receivedAt"]
    models = events.EVENT.json_schema()["$defs"]  # the documented schema still welcomes them
    assert len(models) == len(events.EVENT_TYPES)
    assert all(model["additionalProperties"] is True for model in models.values())
