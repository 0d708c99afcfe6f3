"""Ingest's event handlers: `/webhook` and the tracking API `/v1/*`.

A request is read within its route's limits, authenticated, parsed by relay.ingest.intake and
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
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay import envelope
from relay.errors import QueueUnavailable, RequestError
from relay.ingest import auth, cors, intake, metrics
from relay.ingest.webapp import COMMIT, GATE, REDIS, REQUEST_LOG, SETTINGS, json_response, refusal
from relay.reasons import Reason
from relay.settings import Settings
from relay.state import broker, deadletter

RETRY_AFTER_S = 5
BODY_TIMEOUT_S = 10  # a client slower than this to send its body gets 408 (Segment retries it)


def _unavailable(reason: str) -> web.Response:
    return json_response(
        {"error": f"unavailable: {reason}"}, 503, {"Retry-After": str(RETRY_AFTER_S)}
    )


async def _read_raw(request: web.Request, limits: intake.Limits) -> bytes:
    limit = limits.request_bytes
    too_big = f"request body is larger than {intake.size_text(limit)}"
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


def _check_webhook_auth(settings: Settings, request: web.Request, raw: bytes) -> None:
    if not settings.authenticated:
        return  # `relay serve` refused to start unless this is explicitly allowed
    secret = settings.webhook_secret
    # Segment signs the body as sent, so a gzip body is checked before decoding.
    if secret is not None and auth.valid_signature(
        secret.get_secret_value(), raw, request.headers.get("X-Signature")
    ):
        return
    username = auth.basic_username(request.headers.get("Authorization"))
    if auth.known_key(username, settings.write_keys):
        return
    what = "X-Signature" if secret is not None else "write key"
    raise RequestError(401, f"missing or invalid {what}")


def _check_api_auth(settings: Settings, request: web.Request, body_key: str | None) -> None:
    if not settings.authenticated:
        return
    username = auth.basic_username(request.headers.get("Authorization"))
    if auth.known_key(username, settings.write_keys) or auth.known_key(
        body_key, settings.write_keys
    ):
        return
    raise RequestError(401, "missing or invalid write key")


# Relay ids: unique per process by a random prefix, then a counter; uuid4 would cost a
# system call per event on ingest's hot path.
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def _items(accepted: list[dict[str, Any]], source: str, now: float) -> list[dict[str, Any]]:
    return envelope.fresh(accepted, source, now, _new_id)


async def _ingest(request: web.Request, route: str, source: str) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    started = time.perf_counter()
    outcome: dict[str, Any] = {"route": route}
    try:
        response = await _handle(request, route, source, settings, outcome)
    except RequestError as exc:
        response = refusal(exc)
        outcome["error"] = str(exc)
    except QueueUnavailable as exc:
        response = _unavailable(str(exc))
    elapsed = time.perf_counter() - started
    metrics.FIGURES.request(route, response.status, elapsed)
    app[REQUEST_LOG].record(response.status, elapsed * 1000, outcome)
    return response


async def _handle(
    request: web.Request, route: str, source: str, settings: Settings, outcome: dict[str, Any]
) -> web.Response:
    app = request.app
    gate = app[GATE]
    if not gate.open:
        raise QueueUnavailable(gate.reason)
    limits = intake.WEBHOOK_LIMITS if route == "webhook" else intake.API_LIMITS
    raw = await _read_raw(request, limits)
    if route == "webhook":
        _check_webhook_auth(settings, request, raw)
    body = intake.decode_body(raw, request.headers.get("Content-Encoding"), limits)
    now = datetime.now(UTC)
    parsed = (
        intake.parse_webhook(body, now)
        if route == "webhook"
        else intake.parse_api(route, body, now)
    )
    if route != "webhook":
        _check_api_auth(settings, request, parsed.write_key)
    stamp = now.timestamp()
    items = _items(parsed.accepted, source, stamp)
    rejected = [
        deadletter.new_entry(
            envelope.fresh([r.event], source, stamp, _new_id)[0],
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
            await pipe.execute()
        gate.queued(len(body))  # in Redis now, so in the next reading's used_memory
    except broker.QUEUE_ERRORS as exc:
        outcome["error"] = type(exc).__name__
        raise QueueUnavailable("could not queue the events") from exc
    outcome.update(accepted=len(items), rejected=len(rejected))
    label = "webhook" if route == "webhook" else "api"
    metrics.FIGURES.events(label, "accepted", len(items))
    if parsed.timestamp_fallbacks:
        outcome["timestamp_fallbacks"] = parsed.timestamp_fallbacks
        metrics.FIGURES.fallbacks(label, parsed.timestamp_fallbacks)
    if rejected:
        metrics.FIGURES.events(label, "rejected", len(rejected))
        return json_response(
            {
                "success": True,
                "accepted": len(items),
                "rejected": [{"index": r.index, "errors": r.errors} for r in parsed.rejected],
            }
        )
    return json_response({"success": True})


async def webhook(request: web.Request) -> web.Response:
    """POST (or PUT, PATCH) /webhook: one Segment event, or an array of them."""
    return await _ingest(request, "webhook", "webhook")


def _api_route(request: web.Request) -> str:
    route = request.match_info["route"]
    if route not in intake.SINGLE_ROUTES and route not in intake.BATCH_ROUTES:
        raise web.HTTPNotFound(text=f"no such route: /v1/{route}")
    return route


async def tracking_api(request: web.Request) -> web.Response:
    """POST /v1/{route}: Segment's HTTP Tracking API."""
    route = _api_route(request)
    response = await _ingest(request, route, "api")
    # Errors carry the headers too, or the browser hides their status from analytics.js.
    origins = request.app[SETTINGS].cors_origins
    response.headers.update(cors.response_headers(request.headers.get("Origin"), origins))
    return response


async def tracking_api_preflight(request: web.Request) -> web.Response:
    """OPTIONS /v1/{route}: a browser's CORS preflight before analytics.js posts."""
    _api_route(request)
    origin = request.headers.get("Origin")
    headers = cors.preflight_headers(
        origin,
        request.app[SETTINGS].cors_origins,
        request.headers.get("Access-Control-Request-Headers"),
    )
    if not headers:
        return json_response(
            {"error": f"origin not allowed: {origin} (see RELAY_CORS_ORIGINS)"}, 403
        )
    return web.Response(status=204, headers=headers)
