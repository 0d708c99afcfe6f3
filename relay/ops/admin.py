"""The admin API and status page: an aiohttp sub-application ingest mounts at `/admin`.

Off unless `RELAY_ADMIN_TOKEN` is set. Every data route needs `Authorization: Bearer
<token>`; the page itself holds no data and asks for the token, then calls the API.
Its token check wraps each of its own routes (`guarded`), never `/webhook`. It reads ingest's
settings and clients through `request.config_dict` (keys in relay.ingest.webapp), so it does
not import ingest. Redis calls here are synchronous library functions (the CLI's), run
in a thread.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from functools import wraps
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from relay.errors import MappingError, RequestError
from relay.ingest import auth
from relay.ingest.webapp import SETTINGS, SYNC_REDIS, json_response, refusal
from relay.mapping import load_mapping
from relay.ops import admin_live, preview
from relay.reasons import Reason
from relay.state import broker, deadletter, deadletter_query, status, trace

PAGE = resources.files("relay").joinpath("static/admin.html")
FAVICON = resources.files("relay").joinpath("static/favicon.svg")


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status_code, headers)


def _refused(request: web.Request) -> web.Response | None:
    """Off without a token; bearer-token check for /admin/api/*; the page passes through."""
    settings = request.config_dict[SETTINGS]
    if settings.admin_token is None:
        return _error(404, "admin API is off (set RELAY_ADMIN_TOKEN)")
    if request.path.startswith("/admin/api/"):
        given = auth.bearer_token(request.headers.get("Authorization")) or ""
        expected = settings.admin_token.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    return None


def guarded(handler: Handler) -> Handler:
    """`handler` behind the token check, with refusals and Redis errors answered as JSON.

    A wrapper of each route rather than middlewares: an application with middlewares
    anywhere makes aiohttp build a middleware chain for every request, `/webhook`'s too."""

    @wraps(handler)
    async def guard(request: web.Request) -> web.StreamResponse:
        refused = _refused(request)
        if refused is not None:
            return refused
        try:
            return await handler(request)
        except RequestError as exc:
            return refusal(exc)
        except broker.QUEUE_ERRORS:
            return _error(503, "redis unreachable", {"Retry-After": "5"})

    return guard


def _sync(request: web.Request) -> Any:
    return request.config_dict[SYNC_REDIS]


routes = web.RouteTableDef()


@routes.get("")
@routes.get("/")
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


@routes.get("/favicon.svg")
async def favicon(_: web.Request) -> web.Response:
    """GET /admin/favicon.svg: the page's icon."""
    return web.Response(
        body=FAVICON.read_bytes(), content_type="image/svg+xml",
        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"},
    )  # fmt: skip


@routes.get("/api/status")
async def status_view(request: web.Request) -> web.Response:
    """GET /admin/api/status: the status report."""
    return json_response(await asyncio.to_thread(status.report, _sync(request)))


def _reason(value: Any) -> Reason | None:
    if value is None:
        return None
    try:
        return Reason(value)
    except ValueError:
        raise RequestError(400, f"unknown reason {value!r}") from None


def _moment(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name} must be unix seconds") from None


def _number(request: web.Request, name: str, default: int, high: int) -> int:
    try:
        return min(max(int(request.query.get(name, default)), 0), high)
    except ValueError:
        raise RequestError(400, f"{name} must be a number") from None


@routes.get("/api/dlq")
async def dlq_list(request: web.Request) -> web.Response:
    """GET /admin/api/dlq?reason=&limit=&offset=: a page of dead letters, newest first."""
    reason = _reason(request.query.get("reason") or None)
    limit = _number(request, "limit", 50, 500)
    offset = _number(request, "offset", 0, 10**9)
    r = _sync(request)

    def read() -> dict[str, Any]:
        entries = deadletter.list_entries(r, reason=reason, limit=limit, offset=offset)
        total = deadletter.count(r, reason=reason)
        return {"total": total, "entries": [e.as_dict() for e in entries]}

    return json_response(await asyncio.to_thread(read))


@routes.get("/api/dlq/{id}")
async def dlq_show(request: web.Request) -> web.Response:
    """GET /admin/api/dlq/{id}: one dead letter."""
    entry = await asyncio.to_thread(deadletter.get, _sync(request), request.match_info["id"])
    return json_response(entry.as_dict()) if entry else _error(404, "no such dead letter")


# A selection is a few ids; the app's own limit is sized for Segment's webhook batches.
MAX_BODY_BYTES = 512 * 1024


async def _body(request: web.Request) -> dict[str, Any]:
    size = request.content_length or 0
    raw = b"" if size > MAX_BODY_BYTES else await request.read()
    if max(size, len(raw)) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, max(size, len(raw)))
    try:
        body = orjson.loads(raw)
    except ValueError:
        raise RequestError(400, "body must be JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    return body


def _selection(body: dict[str, Any]) -> deadletter.Selection:
    ids = body.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise RequestError(400, "ids must be a list of strings")
    reason = _reason(body.get("reason"))
    since, until = _moment(body.get("since"), "since"), _moment(body.get("until"), "until")
    try:
        return deadletter.select(
            ids or (), every=body.get("all") is True, reason=reason, since=since, until=until
        )
    except deadletter.SelectionError as exc:
        raise RequestError(
            400,
            "give ids, or all / reason, not both"
            if exc.mixed
            else "give ids, all: true, or reason",
        ) from None


MAX_STEP = 10_000  # the most a bulk step (a request's `limit`) takes


def _limit(body: dict[str, Any]) -> int | None:
    limit = body.get("limit")
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= MAX_STEP:
        raise RequestError(400, f"limit must be a whole number from 1 to {MAX_STEP:,}")
    return limit


def _each_page(
    r: Any, selection: deadletter.Selection, limit: int | None, act: Callable[[list[str]], int]
) -> int:
    """`act` on pages of the selection, oldest first: all of it, or its `limit` oldest
    (read directly: a step of a bulk action need not snapshot the whole index). Returns
    the sum of what `act` returns."""
    if limit is None:
        return sum(act(page) for page in selection.pages(r))
    ids = selection.oldest(r, limit)
    return sum(act(ids[start : start + 500]) for start in range(0, len(ids), 500))


@routes.post("/api/dlq/replay")
async def dlq_replay(request: web.Request) -> web.Response:
    """POST /admin/api/dlq/replay {"ids": [...]} | {"all": true} | {"reason": R}, with
    "since"/"until" (unix s) for all or a reason, and "limit": at most that many of the
    oldest (a bulk replay in steps, to show progress). Answers {"replayed"}, and with a
    limit {"left"}: how many selected entries are still dead letters."""
    body = await _body(request)
    selection, limit = _selection(body), _limit(body)
    r = _sync(request)
    settings = request.config_dict[SETTINGS]
    # The replay lane, a request's worth of events per message.
    queue = broker.Queue(r, settings.message_events)
    per_message = settings.churnzero_batch_size

    def run() -> dict[str, int]:
        replayed = _each_page(
            r, selection, limit, lambda page: deadletter.replay(r, page, queue, per_message)
        )
        return {"replayed": replayed} | _left(r, selection, limit)

    try:
        return json_response(await asyncio.to_thread(run))
    except broker.PUBLISH_ERRORS:
        return _error(503, "could not queue the events")


@routes.post("/api/dlq/purge")
async def dlq_purge(request: web.Request) -> web.Response:
    """POST /admin/api/dlq/purge (same selection and limit as replay): {"purged"(, "left")}."""
    body = await _body(request)
    selection, limit = _selection(body), _limit(body)
    r = _sync(request)

    def run() -> dict[str, int]:
        purged = _each_page(r, selection, limit, lambda page: deadletter.purge(r, page))
        return {"purged": purged} | _left(r, selection, limit)

    return json_response(await asyncio.to_thread(run))


def _left(r: Any, selection: deadletter.Selection, limit: int | None) -> dict[str, int]:
    """After a step (`limit`): how many selected entries are left, for its progress."""
    if limit is None:
        return {}
    if selection.ids:
        return {"left": len(deadletter.get_many(r, list(selection.ids)))}
    return {"left": selection.count(r)}


@routes.post("/api/dlq/summary")
async def dlq_summary(request: web.Request) -> web.Response:
    """POST /admin/api/dlq/summary (same selection as replay): the dry run of a bulk
    replay or purge: counts by reason and by event, and what a replay would do now.
    Nothing is changed."""
    body = await _body(request)
    selection = _selection(body)
    r = _sync(request)
    settings = request.config_dict[SETTINGS]

    def run() -> dict[str, Any]:
        try:
            mapping = load_mapping(settings.mapping_file)
        except MappingError as exc:
            raise RequestError(400, f"the mapping file cannot be used: {exc}") from None
        tally = deadletter_query.Tally()
        pages = preview.entries_pages(
            r, reason=selection.reason, ids=list(selection.ids) or None,
            since=selection.since, until=selection.until,
        )  # fmt: skip
        result = preview.dry_run(r, tally.counting(pages), mapping, settings)
        return tally.as_dict() | {"outcomes": dict(result.outcomes.most_common())}

    return json_response(await asyncio.to_thread(run))


@routes.get("/api/history")
async def history_view(request: web.Request) -> web.Response:
    """GET /admin/api/history: events ingested and delivered per 10 s over the last hour."""
    return json_response(await asyncio.to_thread(status.history, _sync(request)))


@routes.post("/api/preview")
async def preview_view(request: web.Request) -> web.Response:
    """POST /admin/api/preview (a Segment event, array or batch): what it would produce
    now, as `relay preview --json`. Nothing is sent or stored."""
    settings = request.config_dict[SETTINGS]
    source = request.query.get("source") or None
    if source not in (None, "api", "webhook"):
        raise RequestError(400, "source must be api or webhook")
    body = await request.read()
    r = _sync(request)

    def run() -> list[dict[str, Any]]:
        try:
            mapping = load_mapping(settings.mapping_file)
        except MappingError as exc:
            raise RequestError(400, f"the mapping file cannot be used: {exc}") from None
        items, refused = preview.items_of(body, source)
        verdicts = refused + preview.preview(r, items, mapping, settings)
        return [v.as_dict() for v in sorted(verdicts, key=lambda v: v.index)]

    return json_response({"events": await asyncio.to_thread(run)})


@routes.get("/api/trace/{id}")
async def trace_view(request: web.Request) -> web.Response:
    """GET /admin/api/trace/{id}: where the event with this messageId (or relay id) is
    (settled before the record's oldest: from the archive)."""
    from relay.archive import search  # DuckDB and Arrow: loaded by ingest only when asked
    from relay.archive.store import open_store

    r, store = _sync(request), open_store(request.config_dict[SETTINGS])
    found = await asyncio.to_thread(
        trace.find, r, request.match_info["id"],
        archived=lambda wanted: search.sightings(store, r, wanted),
    )  # fmt: skip
    return json_response({"found": [s.as_dict() for s in found]})


# The query's names: `relay search`'s options (user, account: the ids).
_SEARCH = {"message_id": "message_id", "user": "user_id", "anonymous_id": "anonymous_id",
           "account": "account_id", "event": "event", "outcome": "outcome",
           "reason": "reason", "since": "since", "until": "until"}  # fmt: skip


@routes.get("/api/search")
async def search_view(request: web.Request) -> web.Response:
    """GET /admin/api/search?message_id=&user=&anonymous_id=&account=&event=&outcome=
    &reason=&since=&until=&limit=: archived (and settled, not yet archived) events,
    newest first, as `relay search --json`."""
    unknown = sorted(set(request.query) - set(_SEARCH) - {"limit"})
    if unknown:
        raise RequestError(400, f"unknown filter {unknown[0]!r}")
    from relay.archive import search  # DuckDB and Arrow: loaded by ingest only when asked
    from relay.archive.store import open_store

    limit = _number(request, "limit", 50, 1000) or 1
    r, store = _sync(request), open_store(request.config_dict[SETTINGS])

    def run() -> list[dict[str, Any]]:
        given = {_SEARCH[k]: v for k, v in request.query.items() if k in _SEARCH}
        try:
            return search.search(store, r, search.Query.of(given, time.time()), limit)
        except search.QueryError as exc:
            raise RequestError(400, str(exc)) from None

    return json_response({"hits": await asyncio.to_thread(run)})


def create_app() -> web.Application:
    """The admin page and API, to mount on the ingest app at `/admin`."""
    app = web.Application()
    admin_live.install(app)
    for route in [*routes, *admin_live.routes]:
        assert isinstance(route, web.RouteDef)
        app.router.add_route(route.method, route.path, guarded(route.handler), **route.kwargs)
    return app
