"""The admin API and status page, served by ingest under `/admin/`.

Off unless `RELAY_ADMIN_TOKEN` is set. Every data route needs `Authorization: Bearer
<token>`; the page itself holds no data and asks for the token, then calls the API.
Redis calls here are synchronous library functions (the CLI's), run in a thread.
"""

from __future__ import annotations

import asyncio
import hmac
from functools import partial
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from relay import auth, broker, deadletter, intake, preview, status, trace
from relay.errors import MappingError
from relay.mapping import load_mapping

PAGE = resources.files("relay").joinpath("static/admin.html")


def _json(body: Any, status_code: int = 200) -> web.Response:
    return web.Response(
        status=status_code, body=orjson.dumps(body), content_type="application/json"
    )


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = _json({"error": message}, status_code)
    response.headers.update(headers or {})
    return response


class _BadRequest(Exception):
    """A malformed admin request (answered 400 with a JSON error)."""


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer-token check for /admin/api/*; the page and other routes pass through."""
    if not request.path.startswith("/admin"):
        return await handler(request)
    from relay.ingest import SETTINGS

    settings = request.app[SETTINGS]
    if settings.admin_token is None:
        return _error(404, "admin API is off (set RELAY_ADMIN_TOKEN)")
    if request.path.startswith("/admin/api/"):
        given = auth.bearer_token(request.headers.get("Authorization")) or ""
        expected = settings.admin_token.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _error(400, str(exc))
    except broker.QUEUE_ERRORS:
        return _error(503, "redis unreachable", {"Retry-After": "5"})


def _sync(request: web.Request) -> Any:
    from relay.ingest import SYNC_REDIS

    return request.app[SYNC_REDIS]


async def page(_: web.Request) -> web.Response:
    """GET /admin: the status page (plain HTML and JS)."""
    return web.Response(
        text=PAGE.read_text(encoding="utf-8"),
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            # The page is self-contained: the browser may talk to this origin only.
            "Content-Security-Policy": "default-src 'none'; connect-src 'self'; "
            "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        },
    )


async def status_view(request: web.Request) -> web.Response:
    """GET /admin/api/status: the status report."""
    return _json(await asyncio.to_thread(status.report, _sync(request)))


def _reason(request: web.Request) -> str | None:
    reason = request.query.get("reason") or None
    if reason is not None and reason not in deadletter.REASONS:
        raise _BadRequest(f"unknown reason {reason!r}")
    return reason


def _number(request: web.Request, name: str, default: int, high: int) -> int:
    try:
        return min(max(int(request.query.get(name, default)), 0), high)
    except ValueError:
        raise _BadRequest(f"{name} must be a number") from None


async def dlq_list(request: web.Request) -> web.Response:
    """GET /admin/api/dlq?reason=&limit=&offset=: a page of dead letters, newest first."""
    reason = _reason(request)
    limit = _number(request, "limit", 50, 500)
    offset = _number(request, "offset", 0, 10**9)
    r = _sync(request)

    def read() -> dict[str, Any]:
        entries = deadletter.list_entries(r, reason=reason, limit=limit, offset=offset)
        return {"total": deadletter.count(r, reason=reason), "entries": entries}

    return _json(await asyncio.to_thread(read))


async def dlq_show(request: web.Request) -> web.Response:
    """GET /admin/api/dlq/{id}: one dead letter."""
    entry = await asyncio.to_thread(deadletter.get, _sync(request), request.match_info["id"])
    return _json(entry) if entry else _error(404, "no such dead letter")


# A selection is a few ids; the app's own limit is sized for Segment's webhook batches.
MAX_BODY_BYTES = 512 * 1024


async def _selection(request: web.Request) -> tuple[list[str] | None, str | None, bool]:
    size = request.content_length or 0
    raw = b"" if size > MAX_BODY_BYTES else await request.read()
    if max(size, len(raw)) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, max(size, len(raw)))
    try:
        body = orjson.loads(raw)
    except ValueError:
        raise _BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise _BadRequest("ids must be a list of strings")
    reason = body.get("reason")
    if reason is not None and reason not in deadletter.REASONS:
        raise _BadRequest(f"unknown reason {reason!r}")
    every = body.get("all") is True
    if ids and (every or reason):
        raise _BadRequest("give ids, or all / reason, not both")
    if not ids and not every and not reason:
        raise _BadRequest("give ids, all: true, or reason")
    return ids, reason, every


def _pages(r: Any, ids: list[str] | None, reason: str | None) -> Any:
    if ids:
        return iter([ids])
    return deadletter.iter_ids(r, reason=reason)


async def dlq_replay(request: web.Request) -> web.Response:
    """POST /admin/api/dlq/replay {"ids": [...]} | {"all": true} | {"reason": R}."""
    from relay.ingest import SETTINGS

    ids, reason, _ = await _selection(request)
    r = _sync(request)
    settings = request.app[SETTINGS]
    # The replay lane, a request's worth of events per message.
    queue = broker.Queue(r, settings.message_events)
    publish = partial(queue.publish, per_message=settings.churnzero_batch_size)

    def run() -> int:
        return sum(deadletter.replay(r, page, publish) for page in _pages(r, ids, reason))

    try:
        replayed = await asyncio.to_thread(run)
    except broker.PUBLISH_ERRORS:
        return _error(503, "could not queue the events")
    return _json({"replayed": replayed})


async def dlq_purge(request: web.Request) -> web.Response:
    """POST /admin/api/dlq/purge (same selection as replay)."""
    ids, reason, _ = await _selection(request)
    r = _sync(request)
    purged = await asyncio.to_thread(
        lambda: sum(deadletter.purge(r, page) for page in _pages(r, ids, reason))
    )
    return _json({"purged": purged})


async def preview_view(request: web.Request) -> web.Response:
    """POST /admin/api/preview (a Segment event, array or batch): what it would produce
    now, as `relay preview --json`. Nothing is sent or stored."""
    from relay.ingest import SETTINGS

    settings = request.app[SETTINGS]
    source = request.query.get("source") or None
    if source not in (None, "api", "webhook"):
        raise _BadRequest("source must be api or webhook")
    body = await request.read()
    r = _sync(request)

    def run() -> list[dict[str, Any]]:
        try:
            mapping = load_mapping(settings.mapping_file)
        except MappingError as exc:
            raise _BadRequest(f"the mapping file cannot be used: {exc}") from None
        try:
            items, refused = preview.items_of(body, source)
        except intake.BadRequest as exc:
            raise _BadRequest(str(exc)) from None
        verdicts = refused + preview.preview(r, items, mapping, settings)
        return [v.as_dict() for v in sorted(verdicts, key=lambda v: v.index)]

    return _json({"events": await asyncio.to_thread(run)})


async def trace_view(request: web.Request) -> web.Response:
    """GET /admin/api/trace/{id}: where the event with this messageId (or relay id) is."""
    found = await asyncio.to_thread(trace.find, _sync(request), request.match_info["id"])
    return _json({"found": [s.as_dict() for s in found]})


def add_routes(app: web.Application) -> None:
    """Mount the admin page and API on the ingest app."""
    app.middlewares.append(require_token)
    app.router.add_get("/admin", page)
    app.router.add_get("/admin/", page)
    app.router.add_get("/admin/api/status", status_view)
    app.router.add_get("/admin/api/dlq", dlq_list)
    app.router.add_get("/admin/api/dlq/{id}", dlq_show)
    app.router.add_post("/admin/api/dlq/replay", dlq_replay)
    app.router.add_post("/admin/api/dlq/purge", dlq_purge)
    app.router.add_post("/admin/api/preview", preview_view)
    app.router.add_get("/admin/api/trace/{id}", trace_view)
