"""relay.ingest.parsing: request bodies as Segment's libraries and Webhooks destination send
them."""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest

from relay import clock, events
from relay.errors import RequestError
from relay.ingest import auth, parsing
from relay.ingest.parsing import WEBHOOK_LIMITS, decode_body, parse_api, parse_webhook
from tests.conftest import fixture

RECEIVED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def small_track(n: int) -> dict[str, Any]:
    return {"type": "track", "event": "Ping", "userId": f"u{n}"}


# --- what real clients send -------------------------------------------------------------


def test_analytics_python_gzipped_batch_with_body_write_key() -> None:
    # analytics-python: {"batch": [...], "sentAt": ..., "writeKey": ...}, gzip when enabled.
    payload = {
        "batch": [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": "user-1",
                "anonymousId": None,
                "properties": {"revenue": 14.99},
                "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
                "integrations": {},
                "timestamp": "2024-05-03T19:42:50.066179+00:00",
                "messageId": "3f8c1b2e-9d34-4d0a-bb56-0f4c3f1e6a77",
            },
            {
                "type": "identify",
                "userId": "user-1",
                "anonymousId": None,
                "traits": {"email": "pgibbons@example.com"},
                "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
                "integrations": {},
                "timestamp": "2024-05-03T19:42:51.000000+00:00",
                "messageId": "1b5a2c5c-2a0b-4a7e-8e87-b0a1f2c3d4e5",
            },
        ],
        "sentAt": "2024-05-03T19:42:52.000000+00:00",
        "writeKey": "wk_python",
    }
    body = decode_body(gzip.compress(dumps(payload)), "gzip")
    result = parse_api("batch", body, RECEIVED)

    assert result.write_key == "wk_python"
    assert result.rejected == []
    assert [e["type"] for e in result.accepted] == ["track", "identify"]
    first = result.accepted[0]
    assert first["userId"] == "user-1"
    assert "anonymousId" not in first  # None from the library means "not set"
    # Segment's clock correction with the batch's sentAt: the event happened 1.933821 s
    # before the batch was sent, so that long before it was received.
    assert first["timestamp"] == "2030-01-02T03:04:03.066179Z"
    assert first["originalTimestamp"] == "2024-05-03T19:42:50.066179+00:00"
    assert first["properties"] == {"revenue": 14.99}
    assert all("writeKey" not in e for e in result.accepted)


def test_analytics_node_batch_authenticates_by_basic_auth_only() -> None:
    payload = {
        "batch": [
            {
                "type": "track",
                "event": "Item Purchased",
                "userId": "019mr8mf4r",
                "properties": {"name": "Leap to Conclusions Mat"},
                "context": {"library": {"name": "@segment/analytics-node", "version": "2.1.0"}},
                "integrations": {},
                "messageId": "node-next-1717587880184-56f85841-64af-4a1f-890b-87c21c4f74f8",
                "timestamp": "2024-06-05T11:44:40.184Z",
                "_metadata": {"jsRuntime": "node"},
            }
        ],
        "sentAt": "2024-06-05T11:44:40.203Z",
    }
    header = "Basic " + base64.b64encode(b"wk_node:").decode()
    result = parse_api("batch", dumps(payload), RECEIVED)

    assert result.write_key is None
    assert auth.basic_username(header) == "wk_node"
    assert len(result.accepted) == 1
    assert result.accepted[0]["_metadata"] == {"jsRuntime": "node"}
    # sentAt - timestamp = 19 ms on the client's clock, laid onto the receive time.
    assert result.accepted[0]["timestamp"] == "2030-01-02T03:04:04.981000Z"
    assert result.accepted[0]["originalTimestamp"] == "2024-06-05T11:44:40.184Z"


def ajs_event(kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": "2024-06-05T11:44:40.184Z",
        "integrations": {},
        "type": kind,
        "context": {
            "page": {"path": "/login", "url": "https://app.example.com/login"},
            "userAgent": "Mozilla/5.0",
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
        },
        "messageId": "ajs-next-1717587880184-abc",
        "anonymousId": "5f1c1b0e-5a1d-4f5e-9b1d-0c1a2b3c4d5e",
        "writeKey": "wk_browser",
        "sentAt": "2024-06-05T11:44:40.203Z",
        "_metadata": {"bundled": ["Segment.io"], "unbundled": []},
        **extra,
    }


@pytest.mark.parametrize(
    ("route", "event", "expected_type"),
    [
        pytest.param("t", ajs_event("track", event="Clicked Login Button"), "track", id="t"),
        pytest.param(
            "i", ajs_event("identify", userId="u1", traits={"email": "a@b.c"}), "identify", id="i"
        ),
        pytest.param("p", ajs_event("page", name="Login"), "page", id="p"),
    ],
)
def test_analytics_js_short_paths(route: str, event: dict[str, Any], expected_type: str) -> None:
    # analytics.js posts with Content-Type text/plain; the body is the same JSON.
    result = parse_api(route, dumps(event), RECEIVED)
    assert result.write_key == "wk_browser"
    [stored] = result.accepted
    assert stored["type"] == expected_type
    assert stored["anonymousId"] == "5f1c1b0e-5a1d-4f5e-9b1d-0c1a2b3c4d5e"
    assert "writeKey" not in stored


def test_analytics_js_batch_short_path() -> None:
    payload = {
        "batch": [
            ajs_event("track", event="Clicked Login Button"),
            ajs_event("identify", userId="u1", traits={"plan": "pro"}),
        ],
        "sentAt": "2024-06-05T11:44:40.203Z",
        "writeKey": "wk_browser",
    }
    result = parse_api("b", dumps(payload), RECEIVED)
    assert result.write_key == "wk_browser"
    assert [e["type"] for e in result.accepted] == ["track", "identify"]
    assert all("writeKey" not in e for e in result.accepted)


def test_import_route_is_a_batch() -> None:
    result = parse_api("import", dumps({"batch": [small_track(1)]}), RECEIVED)
    assert [e["userId"] for e in result.accepted] == ["u1"]


# Segment HTTP Tracking API docs: single-event examples posted to /v1/identify, /v1/track.
DOCS_IDENTIFY = {
    "userId": "019mr8mf4r",
    "traits": {"email": "pgibbons@example.com", "name": "Peter Gibbons", "industry": "Technology"},
    "context": {"ip": "24.5.68.47"},
    "timestamp": "2012-12-02T00:30:08.276Z",
}
DOCS_TRACK = {
    "userId": "019mr8mf4r",
    "event": "Item Purchased",
    "properties": {"name": "Leap to Conclusions Mat", "revenue": 14.99},
    "context": {"ip": "24.5.68.47"},
    "timestamp": "2012-12-02T00:30:12.984Z",
}


@pytest.mark.parametrize(
    ("route", "body", "expected_type"),
    [("identify", DOCS_IDENTIFY, "identify"), ("track", DOCS_TRACK, "track")],
)
def test_docs_single_event_examples_get_their_type_from_the_path(
    route: str, body: dict[str, Any], expected_type: str
) -> None:
    result = parse_api(route, dumps(body), RECEIVED)
    [stored] = result.accepted
    assert stored["type"] == expected_type
    assert stored["userId"] == "019mr8mf4r"
    assert stored["context"] == {"ip": "24.5.68.47"}
    assert result.write_key is None


def test_single_route_overrides_the_type_in_the_body() -> None:
    body = {**DOCS_TRACK, "type": "page"}
    [stored] = parse_api("track", dumps(body), RECEIVED).accepted
    assert stored["type"] == "track"


def test_single_route_body_type_does_not_excuse_a_missing_event_name() -> None:
    body = {"type": "page", "userId": "u1", "name": "Home"}
    with pytest.raises(RequestError, match="event"):
        parse_api("track", dumps(body), RECEIVED)


def test_docs_batch_example() -> None:
    payload = {
        "batch": [
            {"type": "identify", "userId": "019mr8mf4r", "traits": {"email": "a@example.com"}},
            {
                "type": "track",
                "userId": "019mr8mf4r",
                "event": "Song Played",
                "properties": {"name": "Fallin for You", "artist": "Dierks Bentley"},
                "timestamp": "2012-12-02T00:30:12.984Z",
            },
        ],
        "context": {"device": {"type": "phone", "name": "Apple iPhone 6"}},
    }
    result = parse_api("batch", dumps(payload), RECEIVED)
    assert [e["type"] for e in result.accepted] == ["identify", "track"]
    for stored in result.accepted:
        assert stored["context"] == {"device": {"type": "phone", "name": "Apple iPhone 6"}}


SEGMENT_WEBHOOK_TRACK = {
    "anonymousId": "507f191e810c19729de860ea",
    "channel": "browser",
    "context": {"ip": "8.8.8.8", "userAgent": "Mozilla/5.0"},
    "event": "Email Opened",
    "integrations": {},
    "messageId": "022bb90c-bbac-11e4-8dfc-aa07a5b093db",
    "projectId": "1234",
    "properties": {"subject": "Welcome!", "email": "peter@example.com"},
    "receivedAt": "2015-02-23T22:28:55.387Z",
    "sentAt": "2015-02-23T22:28:55.111Z",
    "timestamp": "2015-02-23T22:28:55.111Z",
    "type": "track",
    "userId": "97980cfea0067",
    "originalTimestamp": "2015-02-23T22:28:55.111Z",
    "version": 2,
}


def test_webhook_single_event() -> None:
    result = parse_webhook(dumps(SEGMENT_WEBHOOK_TRACK), RECEIVED)
    [stored] = result.accepted
    assert stored["event"] == "Email Opened"
    assert stored["timestamp"] == "2015-02-23T22:28:55.111000Z"
    assert stored["receivedAt"] == "2015-02-23T22:28:55.387Z"
    assert stored["version"] == 2


def test_webhook_batch_is_a_json_array() -> None:
    second = {**SEGMENT_WEBHOOK_TRACK, "messageId": "m2", "event": "Email Clicked"}
    result = parse_webhook(dumps([SEGMENT_WEBHOOK_TRACK, second]), RECEIVED)
    assert [e["event"] for e in result.accepted] == ["Email Opened", "Email Clicked"]
    assert result.rejected == []


def test_webhook_type_is_taken_from_the_body() -> None:
    body = {"type": "Identify", "userId": "u1", "traits": {"plan": "pro"}}
    [stored] = parse_webhook(dumps(body), RECEIVED).accepted
    assert stored["type"] == "identify"


# --- the /v1/batch wrapper -------------------------------------------------------------


def test_batch_wrapper_context_and_integrations_merge_with_item_keys_winning() -> None:
    payload = {
        "batch": [
            {
                **small_track(1),
                "context": {"library": {"name": "item-lib"}, "locale": "fr-FR"},
                "integrations": {"ChurnZero": False},
            },
            small_track(2),
        ],
        "context": {"library": {"name": "analytics-go", "version": "3.0.0"}, "ip": "1.2.3.4"},
        "integrations": {"All": False, "ChurnZero": True},
    }
    first, second = parse_api("batch", dumps(payload), RECEIVED).accepted

    assert first["context"] == {"library": {"name": "item-lib"}, "locale": "fr-FR", "ip": "1.2.3.4"}
    assert first["integrations"] == {"All": False, "ChurnZero": False}
    assert second["context"] == {
        "library": {"name": "analytics-go", "version": "3.0.0"},
        "ip": "1.2.3.4",
    }
    assert second["integrations"] == {"All": False, "ChurnZero": True}


def test_batch_wrapper_fills_an_item_context_that_is_null() -> None:
    payload = {"batch": [{**small_track(1), "context": None}], "context": {"ip": "1.2.3.4"}}
    [stored] = parse_api("batch", dumps(payload), RECEIVED).accepted
    assert stored["context"] == {"ip": "1.2.3.4"}


def test_batch_wrapper_message_id_and_sent_at_are_not_copied_into_items() -> None:
    payload = {"batch": [small_track(1)], "messageId": "wrapper", "sentAt": "2009-11-10T23:00:00Z"}
    [stored] = parse_api("batch", dumps(payload), RECEIVED).accepted
    assert "messageId" not in stored
    assert "sentAt" not in stored


# --- credentials never stored -----------------------------------------------------------


def test_write_key_is_taken_from_the_wrapper_and_removed_from_items() -> None:
    payload = {"batch": [{**small_track(1), "writeKey": "wk_item"}], "writeKey": "wk_env"}
    result = parse_api("batch", dumps(payload), RECEIVED)
    assert result.write_key == "wk_env"
    assert "writeKey" not in result.accepted[0]


def test_write_key_of_a_single_event_is_reported_and_removed() -> None:
    result = parse_api("track", dumps({**DOCS_TRACK, "writeKey": "wk_1"}), RECEIVED)
    assert result.write_key == "wk_1"
    assert "writeKey" not in result.accepted[0]


def test_write_key_removed_from_webhook_events() -> None:
    result = parse_webhook(dumps([{**small_track(1), "writeKey": "REDACTED"}]), RECEIVED)
    assert "writeKey" not in result.accepted[0]


def test_write_key_is_not_kept_on_a_rejected_event() -> None:
    payload = {"batch": [{"type": "track", "userId": "u1", "writeKey": "wk_secret"}]}
    [rejected] = parse_api("batch", dumps(payload), RECEIVED).rejected
    assert "writeKey" not in rejected.event


@pytest.mark.parametrize("value", ["", 123, None, ["wk"]])
def test_write_key_that_is_not_a_non_empty_string_is_ignored(value: Any) -> None:
    result = parse_api("batch", dumps({"batch": [small_track(1)], "writeKey": value}), RECEIVED)
    assert result.write_key is None


# --- size and count limits --------------------------------------------------------------


def oversized_track(n: int) -> dict[str, Any]:
    return {**small_track(n), "properties": {"blob": "x" * (33 * 1024)}}


def test_event_over_32kb_in_a_batch_is_rejected_and_the_rest_accepted() -> None:
    payload = {"batch": [small_track(0), oversized_track(1), small_track(2)]}
    result = parse_api("batch", dumps(payload), RECEIVED)
    assert [e["userId"] for e in result.accepted] == ["u0", "u2"]
    [rejected] = result.rejected
    assert rejected.index == 1
    assert rejected.errors == [{"field": "event", "message": "larger than 32 KB"}]


def test_event_just_under_32kb_is_accepted() -> None:
    event = {**small_track(1), "properties": {"blob": "x" * (31 * 1024)}}
    assert len(parse_api("batch", dumps({"batch": [event]}), RECEIVED).accepted) == 1


def test_event_limit_counts_bytes_not_characters() -> None:
    # 11,000 three-byte characters: 11,000 characters but 33,000 bytes.
    event = {**small_track(1), "properties": {"blob": "€" * 11000}}
    result = parse_api("batch", dumps({"batch": [event]}), RECEIVED)
    assert result.accepted == []
    assert result.rejected[0].errors[0]["field"] == "event"


def test_single_event_over_32kb_is_a_bad_request() -> None:
    with pytest.raises(RequestError, match="32 KB"):
        parse_api("track", dumps(oversized_track(1)), RECEIVED)


def test_webhook_takes_events_over_32kb_that_segment_enriched() -> None:
    assert len(parse_webhook(dumps(oversized_track(1)), RECEIVED).accepted) == 1


def test_webhook_single_event_over_64kb_is_dead_lettered_not_refused() -> None:
    # Segment drops what is answered 400: the event must reach the dead-letter queue.
    event = {**small_track(1), "properties": {"blob": "x" * (65 * 1024)}}
    result = parse_webhook(dumps(event), RECEIVED)
    assert result.accepted == []
    [rejected] = result.rejected
    assert rejected.errors == [{"field": "event", "message": "larger than 64 KB"}]
    assert rejected.event["properties"]["blob"] == "x" * (65 * 1024)


def test_webhook_single_invalid_event_is_dead_lettered_not_refused() -> None:
    result = parse_webhook(dumps({"type": "track", "userId": "u1"}), RECEIVED)
    assert result.accepted == []
    assert result.rejected[0].errors == [{"field": "event", "message": "Field required"}]


def test_request_over_500kb_is_a_bad_request() -> None:
    payload = {"batch": [{**small_track(n), "properties": {"b": "x" * 20_000}} for n in range(30)]}
    body = dumps(payload)
    assert len(body) > 500 * 1024
    with pytest.raises(RequestError, match="500 KB"):
        decode_body(body, None)


def test_request_just_under_500kb_passes_decoding_unchanged() -> None:
    body = dumps({"batch": [small_track(1)], "pad": "x" * (499 * 1024)})
    assert decode_body(body, None) == body
    assert decode_body(body, "identity") == body


def test_gzipped_request_is_limited_after_decompression() -> None:
    payload = {"batch": [{**small_track(n), "properties": {"b": "x" * 20_000}} for n in range(30)]}
    compressed = gzip.compress(dumps(payload))
    assert len(compressed) < 500 * 1024
    with pytest.raises(RequestError, match="500 KB"):
        decode_body(compressed, "gzip")


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", " gzip ", "x-gzip"])
def test_gzip_encoding_names(encoding: str) -> None:
    body = dumps({"batch": [small_track(1)]})
    assert decode_body(gzip.compress(body), encoding) == body


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(50)]
    return b"".join(parts) + compressor.flush()


def test_gzip_bomb_is_refused_without_inflating_it(gzip_bomb: bytes) -> None:
    assert len(gzip_bomb) < 500 * 1024  # small on the wire: only the inflated size is too big
    started = time.perf_counter()
    with pytest.raises(RequestError, match="500 KB"):
        decode_body(gzip_bomb, "gzip")
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"this is not gzip at all", id="not-gzip"),
        pytest.param(gzip.compress(b'{"batch": []}')[:-12], id="truncated"),
        pytest.param(b"\x1f\x8b\x08\x00garbage-after-magic", id="corrupt"),
    ],
)
def test_invalid_gzip_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(RequestError, match="gzip"):
        decode_body(body, "gzip")


def test_unsupported_content_encoding_is_a_bad_request() -> None:
    with pytest.raises(RequestError, match="br"):
        decode_body(b"{}", "br")


def test_batch_over_2500_events_is_a_bad_request() -> None:
    body = dumps({"batch": [small_track(n) for n in range(2501)]})
    with pytest.raises(RequestError, match="2500"):
        parse_api("batch", body, RECEIVED)


def test_webhook_takes_the_actions_maximum_of_4000_events() -> None:
    result = parse_webhook(dumps([small_track(n) for n in range(4000)]), RECEIVED)
    assert len(result.accepted) == 4000 and result.rejected == []


def test_webhook_array_over_8000_events_is_a_bad_request() -> None:
    with pytest.raises(RequestError, match="8000"):
        parse_webhook(dumps([small_track(n) for n in range(8001)]), RECEIVED)


def test_webhook_body_limit_is_8_mb_after_decompression() -> None:
    body = dumps([{**small_track(n), "properties": {"b": "x" * 3000}} for n in range(2000)])
    assert 4 * 1024 * 1024 < len(body) < 8 * 1024 * 1024  # beyond /v1/*, within /webhook
    assert decode_body(gzip.compress(body), "gzip", WEBHOOK_LIMITS) == body
    with pytest.raises(RequestError, match="500 KB"):
        decode_body(body, None)
    with pytest.raises(RequestError, match="8 MB"):
        decode_body(gzip.compress(body + b" " * (4 * 1024 * 1024)), "gzip", WEBHOOK_LIMITS)


def test_batch_of_exactly_2500_events_is_accepted() -> None:
    body = dumps({"batch": [small_track(n) for n in range(2500)]})
    assert len(parse_api("batch", body, RECEIVED).accepted) == 2500


# --- bodies that are not usable at all --------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"   \n\t "])
@pytest.mark.parametrize("where", ["api", "webhook"])
def test_empty_body_is_a_bad_request(body: bytes, where: str) -> None:
    with pytest.raises(RequestError, match="empty"):
        parse(where, body)


@pytest.mark.parametrize(
    "body", [b"{not json}", b'{"type": "track",', b"\xff\xfe{}", b"{'single': 'quotes'}"]
)
@pytest.mark.parametrize("where", ["api", "webhook"])
def test_invalid_json_is_a_bad_request(body: bytes, where: str) -> None:
    with pytest.raises(RequestError, match="not valid JSON"):
        parse(where, body)


def parse(where: str, body: bytes) -> parsing.ParsedBody:
    if where == "api":
        return parse_api("track", body, RECEIVED)
    return parse_webhook(body, RECEIVED)


@pytest.mark.parametrize("body", [b"[]", b"[{}]", b'"track"', b"42", b"null", b"true"])
@pytest.mark.parametrize("route", ["track", "batch"])
def test_api_body_that_is_not_an_object_is_a_bad_request(body: bytes, route: str) -> None:
    with pytest.raises(RequestError, match="JSON object"):
        parse_api(route, body, RECEIVED)


@pytest.mark.parametrize("body", [b'"track"', b"42", b"null", b"true"])
def test_webhook_body_that_is_neither_event_nor_array_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(RequestError, match="JSON object"):
        parse_webhook(body, RECEIVED)


def test_webhook_empty_array_is_a_bad_request() -> None:
    with pytest.raises(RequestError, match="empty"):
        parse_webhook(b"[]", RECEIVED)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"batch": {"type": "track"}}, id="object"),
        pytest.param({"batch": "[]"}, id="string"),
        pytest.param({"batch": None}, id="null"),
        pytest.param({"type": "track", "userId": "u1", "event": "e"}, id="missing"),
    ],
)
def test_batch_that_is_not_a_list_is_a_bad_request(payload: dict[str, Any]) -> None:
    with pytest.raises(RequestError, match="batch"):
        parse_api("batch", dumps(payload), RECEIVED)


def test_invalid_single_event_is_a_bad_request_naming_the_field() -> None:
    with pytest.raises(RequestError, match="event: Field required"):
        parse_api("track", dumps({"userId": "u1"}), RECEIVED)


# --- invalid events inside a batch ------------------------------------------------------


def test_invalid_events_in_a_batch_are_rejected_with_field_errors() -> None:
    payload = {
        "batch": [
            small_track(0),
            {"type": "track", "userId": "u1"},
            {"type": "purchase", "userId": "u2"},
            {"userId": "u3", "event": "No Type"},
            "not an event",
            {"type": "identify", "userId": "u5", "traits": ["a"]},
            {"type": "identify", "userId": "u6", "timestamp": "yesterday"},
            {"type": "identify", "userId": "u7"},
        ]
    }
    result = parse_api("batch", dumps(payload), RECEIVED)

    # An unreadable timestamp is no reason to lose the event (u6): see the clock tests.
    assert [e["userId"] for e in result.accepted] == ["u0", "u6", "u7"]
    fields = {r.index: [e["field"] for e in r.errors] for r in result.rejected}
    assert fields == {
        1: ["event"],
        2: ["type"],
        3: ["type"],
        4: ["event"],
        5: ["traits"],
    }
    by_index = {r.index: r for r in result.rejected}
    assert by_index[1].errors == [{"field": "event", "message": "Field required"}]
    assert "unknown event type" in by_index[2].errors[0]["message"]
    assert by_index[4].event == "not an event"
    assert by_index[5].errors == [
        {"field": "traits", "message": "Input should be a valid dictionary"}
    ]


@pytest.mark.parametrize("field", ["context", "integrations", "properties"])
def test_object_fields_must_be_objects_and_null_is_empty(field: str) -> None:
    for bad in (["a"], "text", 3):
        with pytest.raises(RequestError, match=f"{field}: Input should be a valid dictionary"):
            parse_api("track", dumps({**small_track(0), field: bad}), RECEIVED)
    [stored] = parse_api("track", dumps({**small_track(0), field: None}), RECEIVED).accepted
    assert stored[field] is None  # kept as sent; the model reads it as {}
    given = {"plan": {"seats": 3}}
    event = events.parse({**small_track(0), field: given})
    assert getattr(event, field) == given


def test_rejected_event_without_ids_says_so() -> None:
    result = parse_api("batch", dumps({"batch": [{"type": "track", "event": "e"}]}), RECEIVED)
    [rejected] = result.rejected
    assert [e["message"] for e in rejected.errors] == ["userId or anonymousId is required"]


def test_rejected_event_without_ids_names_the_id_field() -> None:
    result = parse_api("batch", dumps({"batch": [{"type": "track", "event": "e"}]}), RECEIVED)
    [rejected] = result.rejected
    assert rejected.errors[0]["field"] in ("userId", "anonymousId", "userId/anonymousId")


def test_webhook_array_with_an_invalid_event_accepts_the_others() -> None:
    body = dumps([small_track(0), {"type": "track", "userId": "u1"}, 7])
    result = parse_webhook(body, RECEIVED)
    assert [e["userId"] for e in result.accepted] == ["u0"]
    assert [r.index for r in result.rejected] == [1, 2]


# --- the published fixtures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "timestamp"),
    [
        ("analytics-go/test-context-track.json", "track", "2009-11-10T23:00:00Z"),
        ("analytics-go/test-enqueue-identify.json", "identify", "2009-11-10T23:00:00Z"),
        ("analytics-go/test-integrations-track.json", "track", "2009-11-10T23:00:00Z"),
        ("analytics-go/test-timestamp-track.json", "track", "2015-07-10T23:00:00Z"),
    ],
)
def test_analytics_go_fixtures_parse(name: str, kind: str, timestamp: str) -> None:
    payload = fixture(name)
    result = parse_api("batch", dumps(payload), RECEIVED)
    assert result.rejected == []
    [stored] = result.accepted
    assert stored["type"] == kind
    # The fixtures' sentAt is 2009-11-10T23:00:00Z: Segment's correction moves each event
    # to the receive time, less how long before sentAt the client stamped it.
    sent = datetime(2009, 11, 10, 23, tzinfo=UTC)
    original = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    assert stored["timestamp"] == clock.iso(RECEIVED - (sent - original))
    assert stored["originalTimestamp"] == payload["batch"][0]["timestamp"]
    assert stored["messageId"] == "I'm unique"
    # The wrapper's library lands in every item.
    assert stored["context"]["library"] == payload["context"]["library"]


def test_analytics_go_item_context_and_integrations_survive_the_wrapper_merge() -> None:
    [with_context] = parse_api(
        "batch", dumps(fixture("analytics-go/test-context-track.json")), RECEIVED
    ).accepted
    assert with_context["context"] == {
        "whatever": "here",
        "library": {"name": "journify-go-sdk", "version": "3.0.0"},
    }
    [with_integrations] = parse_api(
        "batch", dumps(fixture("analytics-go/test-integrations-track.json")), RECEIVED
    ).accepted
    assert with_integrations["integrations"] == {"All": True, "Intercom": False, "Mixpanel": True}


def test_engage_identify_as_delivered_parses_via_webhook() -> None:
    result = parse_webhook(dumps(fixture("engage-audience-identify-as-delivered.json")), RECEIVED)
    [stored] = result.accepted
    assert stored["type"] == "identify"
    assert stored["userId"] == "<USER ID>"
    assert stored["timestamp"] == "2024-05-03T19:42:50.066000Z"
    assert stored["originalTimestamp"] == "2024-05-03T19:42:50.066179717Z"
    assert stored["sentAt"] is None
    assert stored["traits"]["eg_lcm_user_portal_roles_partial_access"] is True
    assert stored["integrations"] == {"All": False, "HubSpot": True, "Warehouses": {"all": False}}
    assert "writeKey" not in stored


def test_anonymous_only_identify_as_delivered_parses_via_webhook() -> None:
    result = parse_webhook(dumps(fixture("identify-anonymous-only-as-delivered.json")), RECEIVED)
    [stored] = result.accepted
    assert stored["anonymousId"] == "hhamed"
    assert "userId" not in stored
    assert stored["timestamp"] == "2024-06-05T11:44:40.433000Z"
    assert "writeKey" not in stored


def test_as_delivered_fixtures_parse_as_a_batched_webhook_array() -> None:
    body = dumps(
        [
            fixture("engage-audience-identify-as-delivered.json"),
            fixture("identify-anonymous-only-as-delivered.json"),
        ]
    )
    result = parse_webhook(body, RECEIVED)
    assert result.rejected == []
    assert [e.get("userId", e.get("anonymousId")) for e in result.accepted] == [
        "<USER ID>",
        "hhamed",
    ]


# --- client clocks (Segment's correction on /v1/*) ----------------------------------------


def test_clock_skew_is_corrected_with_the_event_sent_at() -> None:
    # The client's clock is 3 hours fast: it stamped the event 2 s before sending it.
    event = {
        **small_track(1),
        "timestamp": "2030-01-02T06:04:01Z",
        "sentAt": "2030-01-02T06:04:03Z",
    }
    [stored] = parse_api("track", dumps(event), RECEIVED).accepted
    assert stored["timestamp"] == "2030-01-02T03:04:03Z"
    assert stored["originalTimestamp"] == "2030-01-02T06:04:01Z"


def test_clock_skew_is_corrected_with_a_batch_level_sent_at() -> None:
    # A client clock a day slow; the event's own sentAt, when present, wins.
    payload = {
        "batch": [
            {**small_track(1), "timestamp": "2030-01-01T03:04:00Z"},
            {
                **small_track(2),
                "timestamp": "2030-01-01T03:04:00Z",
                "sentAt": "2030-01-01T03:04:01Z",
            },
        ],
        "sentAt": "2030-01-01T03:04:05Z",
    }
    first, second = parse_api("batch", dumps(payload), RECEIVED).accepted
    assert first["timestamp"] == "2030-01-02T03:04:00Z"
    assert second["timestamp"] == "2030-01-02T03:04:04Z"
    assert first["originalTimestamp"] == second["originalTimestamp"] == "2030-01-01T03:04:00Z"


def test_without_sent_at_the_client_timestamp_stands() -> None:
    [stored] = parse_api("track", dumps({**small_track(1), "timestamp": "2029-05-06T07:08:09Z"}),
                         RECEIVED).accepted  # fmt: skip
    assert stored["timestamp"] == "2029-05-06T07:08:09Z"


def test_webhook_timestamps_are_segments_already_corrected_ones() -> None:
    event = {
        **small_track(1),
        "timestamp": "2029-05-06T07:08:09Z",
        "sentAt": "2030-01-01T00:00:00Z",
    }
    [stored] = parse_webhook(dumps(event), RECEIVED).accepted
    assert stored["timestamp"] == "2029-05-06T07:08:09Z"
    assert "originalTimestamp" not in stored


@pytest.mark.parametrize("where", ["api", "webhook"])
@pytest.mark.parametrize("bad", ["yesterday", "2030-13-45T99:00:00Z", True, {"at": 1}])
def test_unparseable_timestamp_falls_back_to_receive_time_flagged(where: str, bad: Any) -> None:
    event = {**small_track(1), "timestamp": bad, "sentAt": "2030-01-02T03:04:05Z"}
    result = (
        parse_api("track", dumps(event), RECEIVED)
        if where == "api"
        else parse_webhook(dumps([event]), RECEIVED)
    )
    [stored] = result.accepted
    assert stored["timestamp"] == "2030-01-02T03:04:05Z"
    assert stored["originalTimestamp"] == bad
    assert stored[parsing.TIMESTAMP_UNPARSEABLE] is True
    assert result.timestamp_fallbacks == 1


def test_unparseable_sent_at_leaves_the_timestamp_uncorrected() -> None:
    event = {**small_track(1), "timestamp": "2029-05-06T07:08:09Z", "sentAt": "soon"}
    [stored] = parse_api("track", dumps(event), RECEIVED).accepted
    assert stored["timestamp"] == "2029-05-06T07:08:09Z"


def test_an_event_invalid_besides_its_timestamp_is_still_rejected_as_sent() -> None:
    event = {"type": "track", "userId": "u", "timestamp": "x"}
    result = parse_api("batch", dumps({"batch": [event]}), RECEIVED)
    [rejected] = result.rejected
    assert rejected.event["timestamp"] == "x"
    assert {e["field"] for e in rejected.errors} == {"event", "timestamp"}


@pytest.mark.parametrize("route", ["batch", "import", "b"])
def test_a_delete_on_the_tracking_api_is_refused_and_the_rest_accepted(route: str) -> None:
    payload = {"batch": [small_track(1), {"type": "Delete", "userId": "victim"}, small_track(2)]}
    result = parse_api(route, dumps(payload), RECEIVED)
    assert len(result.accepted) == 2 and result.rejected == []
    [refused] = result.refused_deletes
    assert refused.index == 1
    assert refused.errors == [{"field": "type", "message": parsing.DELETE_REFUSED}]


@pytest.mark.parametrize("signed", [False, True])
def test_a_webhook_delete_is_taken_only_from_a_signed_request(signed: bool) -> None:
    body = dumps([{"type": "delete", "userId": "gone"}, SEGMENT_WEBHOOK_TRACK])
    result = parse_webhook(body, RECEIVED, signed=signed)
    assert [e["type"] for e in result.accepted] == (["delete", "track"] if signed else ["track"])
    assert len(result.refused_deletes) == (0 if signed else 1)


def test_original_timestamp_without_timestamp_is_corrected_with_sent_at() -> None:
    event = {**small_track(1), "originalTimestamp": "2030-01-02T03:00:00Z",
             "sentAt": "2030-01-02T03:00:10Z"}  # fmt: skip
    [stored] = parse_api("batch", dumps({"batch": [event]}), RECEIVED).accepted
    # receivedAt - (sentAt - originalTimestamp): ten seconds before the receipt.
    assert stored["timestamp"] == "2030-01-02T03:03:55Z"
    assert stored["originalTimestamp"] == "2030-01-02T03:00:00Z"


def test_an_integral_float_user_id_is_the_integer() -> None:
    [stored] = parse_api("batch", dumps({"batch": [{**small_track(1), "userId": 123.0}]}),
                         RECEIVED).accepted  # fmt: skip
    assert stored["userId"] == "123"
