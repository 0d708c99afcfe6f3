"""The admin page's live panel: settlements as they happen, as server-sent events.

`GET /admin/api/tail?user=&outcome=` follows the record of settlements as `relay tail`
does (relay.state.tail), on ingest's asyncio Redis client: one `data:` line of JSON per
event. The page reads it with fetch, so the admin token stays in its header. Routes here
are wrapped by the admin app's token check (relay.ops.admin.create_app).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
from aiohttp import web

from relay import keys
from relay.errors import RequestError
from relay.ingest.webapp import REDIS, json_response
from relay.state import broker, tail

MAX_TAILS = 8  # live panels open at once, per ingest process: each holds a Redis connection
PING_S = 15  # an idle live panel's keep-alive, which also finds a closed connection
# Set when the ingest process stops: live panels end rather than hold its shutdown.
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("tail_stopping")
TAILS: web.AppKey[list[int]] = web.AppKey("tails")

routes = web.RouteTableDef()


def install(app: web.Application) -> None:
    """Give the admin app what its live panels share: their count and the stop signal."""
    app[STOPPING] = asyncio.Event()
    app[TAILS] = []

    async def stop_tails(app: web.Application) -> None:
        app[STOPPING].set()

    app.on_shutdown.append(stop_tails)


@routes.get("/api/tail")
async def tail_view(request: web.Request) -> web.StreamResponse:
    """GET /admin/api/tail?user=&outcome=: server-sent events, one `data:` line (JSON, as
    `relay tail --json`) per event settled from now on that passes the filters."""
    try:
        wanted = tail.Filter(
            user=request.query.get("user") or None, outcome=request.query.get("outcome") or None
        )
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    tails, stopping = request.app[TAILS], request.app[STOPPING]
    if len(tails) >= MAX_TAILS:
        return json_response(
            {"error": f"{MAX_TAILS} live panels are open already"}, 503, {"Retry-After": "10"}
        )
    r = request.config_dict[REDIS]
    newest = await r.xrevrange(keys.TRACE, count=1)
    last = tail.text_id(newest[0][0]) if newest else "0-0"
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                 "X-Content-Type-Options": "nosniff"},
    )  # fmt: skip
    await response.prepare(request)
    tails.append(id(response))
    try:
        await response.write(b": following settlements\n\n")
        pinged = time.monotonic()
        while not stopping.is_set() and not _gone(request):
            reply = await r.xread({keys.TRACE: last}, count=tail.COUNT, block=tail.BLOCK_MS)
            found, newest_id = tail.settled_after(reply, wanted)
            last = newest_id or last
            lines = b"".join(b"data: " + orjson.dumps(s.as_dict()) + b"\n\n" for s in found)
            if not lines and time.monotonic() - pinged > PING_S:
                lines = b": ping\n\n"
            if lines:
                await response.write(lines)
                pinged = time.monotonic()
    except ConnectionError:
        pass  # the browser went away
    except broker.QUEUE_ERRORS:
        # Redis went away: the panel says so and connects again.
        with contextlib.suppress(ConnectionError):
            await response.write(b"event: problem\ndata: redis unreachable\n\n")
    finally:
        tails.remove(id(response))
    return response


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()
