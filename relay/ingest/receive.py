"""Ingest's event handlers: `/webhook` and the tracking API `/v1/*`.

A request is read within its route's limits, authenticated, parsed by relay.ingest.parsing and
its events queued through the group commit; only then is it answered 200. A request
refused as a whole raises `RequestError`, and one that cannot be queued now raises
`QueueUnavailable` (a 503, which Segment retries); `_ingest` turns both into the answer,
and counts and logs every request once.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay import envelope
from relay.errors import QueueUnavailable, RequestError, Unauthenticated
from relay.ingest import auth, cors, metrics, parsing
from relay.ingest.webapp import ADMISSION, COMMIT, REDIS, REQUEST_LOG, SETTINGS, json_response
from relay.reasons import Reason
from relay.settings import Settings
from relay.state import archive, broker, deadletter

RETRY_AFTER_S = 5
BODY_TIMEOUT_S = 10  # a client slower than this to send its body gets 408 (Segment retries it)


# The `code` of an error answer: older analytics-python reads `code` and `message`.
_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden",
          408: "request_timeout", 503: "unavailable"}  # fmt: skip


def _error(message: str, status: int, headers: dict[str, str] | None = None,
           **extra: Any) -> web.Response:  # fmt: skip
    body = {"error": message, **extra, "code": _CODES.get(status, "error"), "message": message}
    return json_response(body, status, headers)


def _unavailable(reason: str) -> web.Response:
    return _error(f"unavailable: {reason}", 503, {"Retry-After": str(RETRY_AFTER_S)})


async def _read_raw(request: web.Request, limits: parsing.Limits) -> bytes:
    limit = limits.request_bytes
    too_big = f"request body is larger than {parsing.size_text(limit)}"
    if (request.content_length or 0) > limit:
        raise RequestError(400, too_big)
    try:
        if request.content.is_eof():  # the whole body came with the headers: no wait
            body = await request.read()
        else:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(400, too_big) from None
    except TimeoutError:
        raise RequestError(408, "request body took too long") from None
    if len(body) > limit:
        raise RequestError(400, too_big)
    return body


def _check_webhook_auth(settings: Settings, request: web.Request, raw: bytes) -> bool:
    """Authenticate a webhook request; True when its X-Signature is valid (only a signed
    request may carry deletes: a write key is public)."""
    secret = settings.webhook_secret
    given = request.headers.get("X-Signature")
    # Segment signs the body as sent, so a gzip body is checked before decoding.
    if secret is not None and auth.valid_signature(secret.get_secret_value(), raw, given):
        return True
    if not settings.authenticated:
        return False  # `relay serve` refused to start unless this is explicitly allowed
    header = request.headers.get("Authorization")
    username = auth.basic_username(header)
    if auth.known_key(username, settings.write_keys):
        return False
    raise _webhook_refusal(secret is not None, given, username, header)


def _webhook_refusal(
    has_secret: bool, signature: str | None, username: str | None, header: str | None
) -> Unauthenticated:
    # Which check failed, in words the sender's operator can act on (no secret in them).
    if username is not None:
        return Unauthenticated("unknown_write_key", "unknown write key (HTTP Basic username)")
    if has_secret and signature:
        return Unauthenticated(
            "signature_mismatch",
            "X-Signature does not match the body: the Segment destination's shared secret "
            "is not RELAY_WEBHOOK_SECRET",
        )
    if has_secret:
        return Unauthenticated(
            "no_signature",
            "no X-Signature: set the Segment destination's shared secret to "
            "RELAY_WEBHOOK_SECRET (or send a write key as the HTTP Basic username)",
        )
    # Only write keys are configured: a signature cannot be checked without a secret.
    where = "X-Signature is not checked without RELAY_WEBHOOK_SECRET; " if signature else ""
    shape = "an Authorization header that is not HTTP Basic; " if header else ""
    return Unauthenticated(
        "no_write_key", f"no write key: {where}{shape}send one as the HTTP Basic username"
    )


def _check_api_auth(settings: Settings, request: web.Request, body_key: str | None) -> None:
    if not settings.authenticated:
        return
    header = request.headers.get("Authorization")
    username = auth.basic_username(header)
    if auth.known_key(username, settings.write_keys) or auth.known_key(
        body_key, settings.write_keys
    ):
        return
    if username is not None or body_key:
        where = "HTTP Basic username" if username is not None else "writeKey in the body"
        raise Unauthenticated("unknown_write_key", f"unknown write key ({where})")
    shape = "the Authorization header is not HTTP Basic; " if header else ""
    raise Unauthenticated(
        "no_write_key",
        f"no write key: {shape}send it as the HTTP Basic username (as Segment's libraries "
        "do) or as writeKey in the body",
    )


def _unsigned(settings: Settings, request: web.Request, raw: bytes) -> bool:
    return False  # the tracking API has no signature: its write key is checked once parsed


def _no_body_key(settings: Settings, request: web.Request, body_key: str | None) -> None:
    return None  # a webhook's write key was checked with its signature, before decoding


@dataclass(frozen=True, slots=True)
class Route:
    """One kind of ingest route: its limits, authentication, parser and metrics label."""

    label: str  # the metrics label, and the source recorded on each queued event
    limits: parsing.Limits
    # Authentication has two moments: a signature covers the body as sent, so it is checked
    # before decoding (True when signed); a write key may be inside the body, so after parsing.
    check_signature: Callable[[Settings, web.Request, bytes], bool]
    parse: Callable[[str, bytes, datetime, bool], parsing.ParsedBody]
    check_write_key: Callable[[Settings, web.Request, str | None], None]


WEBHOOK = Route(
    label="webhook",
    limits=parsing.WEBHOOK_LIMITS,
    check_signature=_check_webhook_auth,
    parse=lambda name, body, now, signed: parsing.parse_webhook(body, now, signed=signed),
    check_write_key=_no_body_key,
)
API = Route(
    label="api",
    limits=parsing.API_LIMITS,
    check_signature=_unsigned,
    parse=lambda name, body, now, signed: parsing.parse_api(name, body, now),
    check_write_key=_check_api_auth,
)


# Relay ids: unique per process by a random prefix, then a counter; uuid4 would cost a
# system call per event on ingest's hot path.
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def _items(accepted: list[dict[str, Any]], source: str, now: float) -> list[dict[str, Any]]:
    return envelope.fresh(accepted, source, now, _new_id)


async def _ingest(request: web.Request, name: str, route: Route) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    started = time.perf_counter()
    outcome: dict[str, Any] = {"route": name}
    try:
        response = await _handle(request, name, route, settings, outcome)
    except RequestError as exc:
        response = _error(str(exc), exc.status, **exc.body)
        outcome["error"] = str(exc)
        if isinstance(exc, Unauthenticated):
            outcome["check"] = exc.check
    except QueueUnavailable as exc:
        response = _unavailable(str(exc))
        outcome["reason"] = str(exc)
    elapsed = time.perf_counter() - started
    metrics.INGEST_STATS.request(name, response.status, elapsed)
    app[REQUEST_LOG].record(response.status, elapsed * 1000, outcome)
    return response


async def _handle(
    request: web.Request, name: str, route: Route, settings: Settings, outcome: dict[str, Any]
) -> web.Response:
    app = request.app
    admission = app[ADMISSION]
    if not admission.open:
        raise QueueUnavailable(admission.reason)
    raw = await _read_raw(request, route.limits)
    signed = route.check_signature(settings, request, raw)
    body = parsing.decode_body(raw, request.headers.get("Content-Encoding"), route.limits)
    now = datetime.now(UTC)
    parsed = route.parse(name, body, now, signed)
    route.check_write_key(settings, request, parsed.write_key)
    stamp = now.timestamp()
    items = _items(parsed.accepted, route.label, stamp)
    rejected = [
        deadletter.new_entry(
            envelope.fresh([r.event], route.label, stamp, _new_id)[0],
            Reason.INVALID_EVENT,
            errors=r.errors,
            now=stamp,
            entry_id=deadletter.entry_id_of(r.event),
        )
        for r in parsed.rejected
    ]  # fmt: skip
    try:
        # The good events first: a batch answered 503 is sent again whole, so its invalid
        # events are written only once the rest is queued, under ids made from their
        # content, so that a batch sent again does not dead-letter them twice.
        await app[COMMIT].submit(items)
        if rejected:
            pipe = app[REDIS].pipeline(transaction=True)
            deadletter.stage_add(pipe, rejected)
            if settings.archive:
                archive.stage_records(pipe, archive.settled_records(stamp, dead=rejected))
            await pipe.execute()
        admission.queued(len(body))  # in Redis now, so in the next reading's used_memory
    except broker.QUEUE_ERRORS as exc:
        outcome["error"] = type(exc).__name__
        raise QueueUnavailable("could not queue the events") from exc
    refused = parsed.refused_deletes
    outcome.update(accepted=len(items), rejected=len(rejected) + len(refused))
    metrics.INGEST_STATS.events(route.label, "accepted", len(items))
    if parsed.timestamp_fallbacks:
        outcome["timestamp_fallbacks"] = parsed.timestamp_fallbacks
        metrics.INGEST_STATS.fallbacks(route.label, parsed.timestamp_fallbacks)
    if rejected:
        metrics.INGEST_STATS.events(route.label, "rejected", len(rejected))
    if refused:
        metrics.INGEST_STATS.events(route.label, "refused_delete", len(refused))
    if rejected or refused:
        listed = sorted(parsed.rejected + refused, key=lambda r: r.index)
        return json_response(
            {
                "success": True,
                "accepted": len(items),
                "rejected": [{"index": r.index, "errors": r.errors} for r in listed],
            }
        )
    return json_response({"success": True})


async def webhook(request: web.Request) -> web.Response:
    """POST (or PUT, PATCH) /webhook: one Segment event, or an array of them."""
    return await _ingest(request, "webhook", WEBHOOK)


def _api_route(request: web.Request) -> str:
    route = request.match_info["route"]
    if route not in parsing.SINGLE_ROUTES and route not in parsing.BATCH_ROUTES:
        raise web.HTTPNotFound(text=f"no such route: /v1/{route}")
    return route


async def tracking_api(request: web.Request) -> web.Response:
    """POST /v1/{route}: Segment's HTTP Tracking API."""
    route = _api_route(request)
    response = await _ingest(request, route, API)
    # Errors carry the headers too, or the browser hides their status from analytics.js.
    origins = request.app[SETTINGS].cors_origins
    response.headers.update(cors.response_headers(request.headers.get("Origin"), origins))
    return response


async def tracking_api_preflight(request: web.Request) -> web.Response:
    """OPTIONS /v1/{route}: a browser's CORS preflight before analytics.js posts."""
    route = _api_route(request)
    origin = request.headers.get("Origin")
    headers = cors.preflight_headers(
        origin,
        request.app[SETTINGS].cors_origins,
        request.headers.get("Access-Control-Request-Headers"),
    )
    if not headers:
        error = f"origin not allowed: {origin} (see RELAY_CORS_ORIGINS)"
        outcome = {"route": route, "check": "cors_origin", "error": error}
        request.app[REQUEST_LOG].refused(403, 0.0, outcome)
        return _error(error, 403)
    return web.Response(status=204, headers=headers)
