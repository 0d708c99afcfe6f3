"""Segment payloads of the benchmarks: what analytics.js and the server libraries send."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

from tests.bench.harness import WRITE_KEY

CONTEXT: dict[str, Any] = {
    "ip": "203.0.113.42",
    "library": {"name": "analytics.js", "version": "next-1.70.0"},
    "locale": "en-US",
    "page": {
        "path": "/app/reports",
        "title": "Reports | Example",
        "url": "https://app.example.com/app/reports?range=30d",
    },
    "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Chrome/124.0.0.0",
}


def track(
    user: int, *, description: str | None = None, ids: bool = False, message_id: str | None = None
) -> dict[str, Any]:
    """A Segment track event of user `user` (resolved through identify unless `ids`)."""
    properties: dict[str, Any] = {
        "report": "Weekly active accounts",
        "format": "csv",
        "rows": 1250,
        "quantity": 1,
        "plan": "enterprise",
    }
    if description is not None:
        properties["description"] = description
    if ids:
        properties["accountExternalId"] = f"acct-{user % 100:04d}"
        properties["contactExternalId"] = f"user-{user:06d}@example.com"
    return {
        "type": "track",
        "event": "Report Exported",
        "userId": f"user-{user:06d}",
        "messageId": message_id or f"ajs-next-{uuid.uuid4().hex}",
        "timestamp": "2024-05-14T09:31:12.345Z",
        "sentAt": "2024-05-14T09:31:12.350Z",
        "properties": properties,
        "context": CONTEXT,
        "integrations": {},
        "version": 2,
    }


def identify(user: int) -> dict[str, Any]:
    """The identify that teaches the relay who `user` is in ChurnZero."""
    return {
        "type": "identify",
        "userId": f"user-{user:06d}",
        "messageId": f"ajs-next-{uuid.uuid4().hex}",
        "timestamp": "2024-05-14T09:30:00.000Z",
        "traits": {
            "accountExternalId": f"acct-{user % 100:04d}",
            "contactExternalId": f"user-{user:06d}@example.com",
            "email": f"user-{user:06d}@example.com",
            "firstName": "Ada",
            "lastName": "Lovelace",
            "plan": "enterprise",
        },
        "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
        "version": 2,
    }


def batch_body(events: list[dict[str, Any]]) -> bytes:
    """A `/v1/batch` body as analytics-node sends it."""
    return orjson.dumps(
        {
            "batch": events,
            "sentAt": "2024-05-14T09:31:12.400Z",
            "context": {"library": {"name": "@segment/analytics-node", "version": "2.1.0"}},
        }
    )


def basic_auth(write_key: str = WRITE_KEY) -> str:
    """Segment's Basic auth header: the write key as username, no password."""
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
