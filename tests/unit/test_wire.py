"""relay.wire: a group's Celery message is compressed as Celery's `compression="zlib"`
does it, and reads back to the same items; what is not a message body is refused."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import orjson
import pytest

from relay import envelope, wire


def batch(n: int) -> list[dict[str, Any]]:
    events = [
        {"type": "track", "userId": f"user-{i:06d}", "event": "Report Exported",
         "messageId": f"m-{i}", "timestamp": "2026-11-29T10:00:00.000Z",
         "properties": {"report": "Weekly active accounts", "rows": i},
         "context": {"library": {"name": "analytics.js", "version": "next-1.70.0"}}}
        for i in range(n)
    ]  # fmt: skip
    return envelope.fresh(events, "api", 1.5, iter(f"r{i}" for i in range(n)).__next__)


def test_a_message_is_compressed_and_reads_back_to_its_items() -> None:
    items = batch(100)
    raw = wire.MessageWriter().encode(items)
    message = json.loads(raw)
    assert message["headers"]["compression"] == "application/x-gzip"  # kombu's zlib
    assert message["properties"]["body_encoding"] == "base64"
    assert wire.items_of(message) == items
    # What Redis holds for a batch is a fraction of its events' JSON.
    assert len(raw) < len(orjson.dumps(items)) / 4


def test_an_uncompressed_message_reads_as_before() -> None:
    items = batch(2)
    message = json.loads(wire.MessageWriter().encode(items))
    del message["headers"]["compression"]
    message["body"] = base64.b64encode(orjson.dumps([[items], {}, {}])).decode()
    assert wire.items_of(message) == items


@pytest.mark.parametrize(
    ("compression", "body", "error"),
    [
        ("application/x-bz2", zlib.compress(b"[[[]],{},{}]"), "unsupported compression"),
        ("application/x-gzip", b"not zlib at all", "does not inflate"),
    ],
)
def test_a_body_that_does_not_inflate_is_refused(compression: str, body: bytes, error: str) -> None:
    message = json.loads(wire.MessageWriter().encode(batch(1)))
    message["headers"]["compression"] = compression
    message["body"] = base64.b64encode(body).decode()
    with pytest.raises(ValueError, match=error):
        wire.items_of(message)


def test_a_packed_batch_is_smaller_and_a_plain_json_one_still_reads() -> None:
    waiting = {"id": "b", "items": batch(50), "cause": "5xx"}  # a delayed-set member
    packed = wire.pack(waiting)
    assert len(packed) < len(orjson.dumps(waiting)) / 4
    assert wire.unpack(packed) == waiting
    assert wire.unpack(orjson.dumps(waiting)) == waiting  # stored before members were packed
    with pytest.raises(ValueError, match="does not inflate"):
        wire.unpack(b"not a batch")
