"""The OpenAPI document: valid OpenAPI 3.0, whole, and saying of a request what the
relay does with it (the payloads Segment's libraries send are valid by it; what the
parser refuses, it refuses too)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import orjson
import pytest
import schemathesis

from relay.errors import RequestError
from relay.ingest import parsing
from relay.ingest.openapi import SPEC
from tests.conftest import fixture

SCHEMAS = SPEC["components"]["schemas"]


def test_the_document_is_valid_openapi_3_0() -> None:
    schemathesis.openapi.from_dict(SPEC).validate()


def test_every_reference_names_a_schema_and_every_schema_is_referred_to() -> None:
    referred = set(re.findall(r'"#/components/schemas/([^"]+)"', orjson.dumps(SPEC).decode()))
    assert referred == set(SCHEMAS)


def as_json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema says it (`nullable` as a null type)."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


def valid_by_document(path: str, body: Any) -> bool:
    """Whether `body` is valid by the document as a JSON request body of POST `path`."""
    schema = SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    root = {**as_json_schema(schema), "components": {"schemas": as_json_schema(SCHEMAS)}}
    return bool(jsonschema_rs.Draft4Validator(root).is_valid(body))


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("clients/analytics-node-batch.json", "/v1/batch"),
        ("clients/analytics-python-batch.json", "/v1/batch"),
        ("clients/analytics-next-track.json", "/v1/t"),
        ("clients/analytics-next-identify.json", "/v1/i"),
        ("analytics-go/test-context-track.json", "/v1/batch"),
        ("analytics-go/test-enqueue-identify.json", "/v1/batch"),
        ("analytics-go/test-integrations-track.json", "/v1/batch"),
        ("analytics-go/test-timestamp-track.json", "/v1/batch"),
        ("webhooks/single-track.json", "/webhook"),
        ("webhooks/batched.json", "/webhook"),
        ("engage-audience-identify-as-delivered.json", "/webhook"),
        ("identify-anonymous-only-as-delivered.json", "/webhook"),
    ],
)
def test_what_segment_sends_is_valid_by_the_document(name: str, path: str) -> None:
    assert valid_by_document(path, fixture(name))


NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
TRACK = {"userId": "u1", "event": "Signed Up"}


def parser_accepts(path: str, body: Any) -> bool:
    raw = orjson.dumps(body)
    try:
        if path == "/webhook":
            return not parsing.parse_webhook(raw, NOW).rejected
        return not parsing.parse_api(path.removeprefix("/v1/"), raw, NOW).rejected
    except RequestError:
        return False


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/track", TRACK),  # the path sets the type
        ("/v1/t", {**TRACK, "type": "identify"}),  # whatever the body says
        ("/v1/track", {"userId": "u1"}),  # a track names its event
        ("/v1/track", {**TRACK, "event": ""}),
        ("/v1/track", {**TRACK, "userId": 42, "timestamp": 1_767_614_400_000}),
        ("/v1/identify", {"userId": "u1", "traits": {"plan": "Pro"}, "writeKey": "k"}),
        ("/v1/group", {"userId": "u1", "groupId": 7}),
        ("/v1/track", {**TRACK, "properties": []}),
        ("/v1/batch", {"batch": [{**TRACK, "type": "track"}], "sentAt": 1_767_614_400_000}),
        ("/v1/batch", {"batch": {}}),
        ("/webhook", {**TRACK, "type": "track", "context": {"ip": "10.0.0.1"}}),
        ("/webhook", {**TRACK, "type": "bogus"}),
        ("/webhook", {**TRACK}),  # no type
        ("/webhook", [{"type": "alias", "userId": "u1", "previousId": "a1"}]),
        ("/webhook", "a string"),
    ],
)
def test_the_document_takes_what_the_parser_takes(path: str, body: Any) -> None:
    assert valid_by_document(path, body) == parser_accepts(path, body)


def test_a_tracking_api_call_needs_no_type_and_may_carry_the_write_key() -> None:
    call = SCHEMAS["TrackCall"]
    assert call["required"] == ["event"]
    assert "writeKey" in call["properties"]
    assert "required" not in SCHEMAS["IdentifyCall"]
