"""Request bodies into events: decoding, size limits, the batch wrapper, validation.

Pure: bytes in, a `ParsedBody` (accepted events, rejected ones with their errors) out,
or a `RequestError` (400) naming what is wrong with the request as a whole.

Two sets of limits: the tracking API (`/v1/*`) keeps Segment's own, which its libraries
respect; `/webhook` takes what Segment's Webhooks (Actions) destination sends, with
room to spare, because Segment drops whatever we answer 400 and never retries it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from relay import clock, events
from relay.errors import RequestError


@dataclass(frozen=True)
class Limits:
    """Size and count limits of one kind of route (bytes after decompression)."""

    event_bytes: int
    request_bytes: int
    batch_events: int


# Segment's HTTP Tracking API limits, which its libraries already respect.
API_LIMITS = Limits(event_bytes=32 * 1024, request_bytes=500 * 1024, batch_events=2500)
# Segment's Actions webhook batches 1,000 events by default and up to 4,000, about 4 MB;
# twice that is headroom. Events grow on their way through Segment (receivedAt, context
# enrichment), so one may pass 32 KB: above 64 KB it is dead-lettered, never refused.
WEBHOOK_LIMITS = Limits(event_bytes=64 * 1024, request_bytes=8 * 1024 * 1024, batch_events=8000)
MAX_BATCH_EVENTS = API_LIMITS.batch_events
# Flags an event whose timestamp could not be read (the receive time stands in for it).
TIMESTAMP_UNPARSEABLE = "timestampUnparseable"
# Deeper events are refused: Segment's own never come close, and orjson writes at most
# 254 levels, so anything near that could not be queued or dead-lettered.
MAX_DEPTH = 64

# Routes of the tracking API, short analytics.js spellings included.
SINGLE_ROUTES = {
    "identify": "identify",
    "track": "track",
    "page": "page",
    "screen": "screen",
    "group": "group",
    "alias": "alias",
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
}
BATCH_ROUTES = frozenset({"batch", "import", "b"})


@dataclass(frozen=True)
class Rejected:
    """One event of a batch that failed validation, with its field errors."""

    index: int
    errors: list[dict[str, str]]
    event: Any


# Why a `delete` is refused where the request cannot prove it comes from Segment's privacy
# tooling: write keys are public (every browser page carries one).
DELETE_REFUSED = (
    "delete is accepted only from a signed /webhook request (Segment's privacy tooling) "
    "or `relay identities forget`; nothing was deleted"
)


@dataclass
class ParsedBody:
    """What one request carried: valid events (normalised), rejected ones (dead-lettered)
    and refused deletes (counted, changing nothing)."""

    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    refused_deletes: list[Rejected] = field(default_factory=list)
    write_key: str | None = None
    timestamp_fallbacks: int = 0  # events whose timestamp was unreadable


def size_text(limit: int) -> str:
    """A byte limit as people read it: `500 KB`, `8 MB`."""
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MB"
    return f"{limit // 1024} KB"


def decode_body(body: bytes, content_encoding: str | None, limits: Limits = API_LIMITS) -> bytes:
    """The body, gunzipped if it says so, within the request size limit."""
    limit = limits.request_bytes
    if len(body) > limit:
        raise RequestError(400, f"request body is larger than {size_text(limit)}")
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise RequestError(400, f"unsupported Content-Encoding: {content_encoding}")
    # Decompress at most one byte past the limit, so a gzip bomb costs nothing.
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"body is not valid gzip: {exc}") from None
    if len(plain) > limit:
        raise RequestError(400, f"decompressed request body is larger than {size_text(limit)}")
    if not inflater.eof:
        raise RequestError(400, "body is not valid gzip: truncated")
    return plain


def load_json(body: bytes) -> Any:
    """The body as JSON, or a RequestError (400)."""
    if not body.strip():
        raise RequestError(400, "body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic errors as `[{"field": "event", "message": "Field required"}]`."""
    out = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        # The first element of a union error is the matched tag (`track`), not a field.
        if loc and loc[0] in events.EVENT_TYPES:
            loc = loc[1:]
        where = ".".join(str(part) for part in loc) or "event"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "is_instance_of":  # an object field (relay.events._Object)
            message = "Input should be a valid dictionary"
        if message.startswith("userId or anonymousId"):
            where = "userId"
        if error["type"] == "union_tag_invalid":
            where, message = "type", f"unknown event type (expected one of {events.EVENT_TYPES})"
        elif error["type"] == "union_tag_not_found":
            where, message = "type", "Field required"
        out.append({"field": where, "message": message})
    return out


@dataclass(frozen=True)
class _Route:
    """How events of one request are taken: its limits, and the batch's `sentAt`."""

    limits: Limits
    received_at: datetime
    correct_clock: bool = False  # /v1/*: Segment's clock correction is ours to do
    batch_sent_at: datetime | None = None  # parsed once per batch, not once per event
    deletes: bool = False  # a signed webhook: `delete` events are Segment's own


def _accept(parsed: ParsedBody, index: int, raw: Any, route: _Route) -> None:
    if isinstance(raw, dict):
        raw.pop("writeKey", None)  # a credential, never stored
    try:
        encoded = orjson.dumps(raw)
    except TypeError:  # orjson's recursion limit: far deeper than MAX_DEPTH
        encoded = b"[" * (MAX_DEPTH + 1)
    if _too_deep(raw, encoded):
        error = {"field": "event", "message": f"nested deeper than {MAX_DEPTH} levels"}
        placeholder = {"omitted": f"event nested deeper than {MAX_DEPTH} levels"}
        parsed.rejected.append(Rejected(index, [error], placeholder))
        return
    if not isinstance(raw, dict):
        error = {"field": "event", "message": "must be a JSON object"}
        parsed.rejected.append(Rejected(index, [error], raw))
        return
    limit = route.limits.event_bytes
    if len(encoded) > limit:
        error = {"field": "event", "message": f"larger than {size_text(limit)}"}
        parsed.rejected.append(Rejected(index, [error], raw))
        return
    unreadable, original = False, raw.get("timestamp")
    try:
        event = events.parse(raw)
    except ValidationError as exc:
        if "timestamp" not in raw or not _only_timestamp(exc):
            parsed.rejected.append(Rejected(index, field_errors(exc), raw))
            return
        # A bad clock value is no reason to lose the event: the receive time stands in.
        given, raw = raw, {k: v for k, v in raw.items() if k != "timestamp"}
        try:
            event = events.parse(raw)
        except ValidationError as again:
            parsed.rejected.append(Rejected(index, field_errors(again), given))
            return
        unreadable = True
    if event.type == "delete" and not route.deletes:
        error = {"field": "type", "message": DELETE_REFUSED}
        parsed.refused_deletes.append(Rejected(index, [error], raw))
        return
    stamp = None
    client_time = event.timestamp
    if client_time is None and not unreadable and "originalTimestamp" in raw:
        # A client that sent only originalTimestamp: Segment corrects that one.
        original = raw["originalTimestamp"]
        client_time = clock.parse_instant(original)
    if not unreadable and route.correct_clock and client_time is not None:
        sent_at = clock.parse_instant(raw["sentAt"]) if "sentAt" in raw else route.batch_sent_at
        stamp = clock.corrected(client_time, sent_at, route.received_at)
    stored = events.normalized(raw, event, route.received_at, stamp=stamp)
    if unreadable:
        stored["originalTimestamp"] = original
        stored[TIMESTAMP_UNPARSEABLE] = True
        parsed.timestamp_fallbacks += 1
    elif stamp is not None:
        stored["originalTimestamp"] = original
    parsed.accepted.append(stored)


def _only_timestamp(exc: ValidationError) -> bool:
    # The union's tag comes first in the location: ("track", "timestamp").
    locs = [tuple(e["loc"]) for e in exc.errors(include_url=False, include_input=False)]
    return bool(locs) and all(loc[-1:] == ("timestamp",) and len(loc) <= 2 for loc in locs)


def _too_deep(raw: Any, encoded: bytes) -> bool:
    # Fewer openers than the limit cannot nest that deep: the common case costs a count.
    if encoded.count(b"{") + encoded.count(b"[") <= MAX_DEPTH:
        return False
    return _depth(raw, 0) > MAX_DEPTH


def _depth(value: Any, level: int) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _single(parsed: ParsedBody, raw: dict[str, Any], route: _Route) -> ParsedBody:
    # A lone event's errors are the request's errors: the caller gets them directly.
    _accept(parsed, 0, raw, route)
    if parsed.rejected:
        errors = parsed.rejected[0].errors
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise RequestError(400, f"invalid event: {detail}")
    return parsed


def _check_count(items: list[Any], limits: Limits) -> None:
    if len(items) > limits.batch_events:
        raise RequestError(
            400, f"batch has {len(items)} events; the limit is {limits.batch_events}"
        )


def parse_webhook(body: bytes, received_at: datetime, *, signed: bool = False) -> ParsedBody:
    """A Segment Webhooks destination request: one event, or an array when batching.
    `signed`: its X-Signature is valid (only then are `delete` events taken).

    An invalid event is dead-lettered, not refused, even alone: Segment drops a 400."""
    data = load_json(body)
    parsed = ParsedBody()
    route = _Route(WEBHOOK_LIMITS, received_at, deletes=signed)
    if isinstance(data, dict):
        parsed.write_key = _string(data.get("writeKey"))
        _accept(parsed, 0, data, route)
        return parsed
    if isinstance(data, list):
        if not data:
            raise RequestError(400, "batch is empty")
        _check_count(data, WEBHOOK_LIMITS)
        for index, raw in enumerate(data):
            _accept(parsed, index, raw, route)
        return parsed
    raise RequestError(400, "body must be a JSON object (an event) or an array of events")


def parse_api(route: str, body: bytes, received_at: datetime) -> ParsedBody:
    """A tracking API request to `/v1/<route>` (single-event route or batch)."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    parsed = ParsedBody(write_key=_string(data.get("writeKey")))
    if route in BATCH_ROUTES:
        items = data.get("batch")
        if not isinstance(items, list):
            raise RequestError(400, "batch: must be an array of events")
        _check_count(items, API_LIMITS)
        context = data.get("context")
        integrations = data.get("integrations")
        sent_at = clock.parse_instant(data.get("sentAt"))
        batch = _Route(API_LIMITS, received_at, correct_clock=True, batch_sent_at=sent_at)
        for index, raw in enumerate(items):
            if isinstance(raw, dict):
                _merge(raw, "context", context)
                _merge(raw, "integrations", integrations)
            _accept(parsed, index, raw, batch)
        return parsed
    # The path says what the event is, whatever the body claims.
    data["type"] = SINGLE_ROUTES[route]
    return _single(parsed, data, _Route(API_LIMITS, received_at, correct_clock=True))


def _merge(item: dict[str, Any], key: str, wrapper: Any) -> None:
    # The wrapper's values are defaults; the event's own win, key by key.
    if not isinstance(wrapper, dict) or not wrapper:
        return
    own = item.get(key)
    item[key] = {**wrapper, **own} if isinstance(own, dict) else dict(wrapper)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
