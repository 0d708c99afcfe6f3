"""The ingest service: Segment events in over HTTP, durably into Redis, answered fast.

`create_app(settings, redis_url)` builds the aiohttp application. Routes:
`POST /webhook` (Segment's Webhooks destination) and the tracking API under `/v1/`
(relay.ingest.receive), `/livez`, `/readyz`, `/metrics` and `/openapi.json`. What
`relay serve` runs adds the admin page and API, a sub-application under `/admin`
(relay.ops.server), which ingest does not import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable

import redis
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.ingest import metrics, openapi, parsing, receive
from relay.ingest.admission import Admission
from relay.ingest.publisher import ConfirmedPublisher, GroupCommit
from relay.ingest.requestlog import RequestLog
from relay.ingest.webapp import (
    ADMISSION,
    COMMIT,
    DEPLOYMENT,
    REDIS,
    REQUEST_LOG,
    SETTINGS,
    SYNC_REDIS,
    json_response,
)
from relay.settings import Settings
from relay.state import broker, recent, redis_conn, status

# A Redis that is down fails the ping within the client's connect timeout; this bounds a
# Redis that takes connections but does not answer.
READY_TIMEOUT_S = 2


async def livez(_: web.Request) -> web.Response:
    """GET /livez: the process answers (no dependencies checked)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis answers, the queue is under its high-water mark and Redis's
    memory under RELAY_MAX_MEMORY_FRACTION of maxmemory; answered within READY_TIMEOUT_S."""
    admission = request.app[ADMISSION]
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await request.app[REDIS].ping()
            await admission.refresh(request.app[REDIS])
    except (redis.RedisError, OSError, TimeoutError):
        admission.redis_ok, admission.reason = False, "redis unreachable"
    levels = {"waiting": admission.waiting, "memory_fraction": round(admission.memory_fraction, 4)}
    if not admission.open:
        return json_response({"status": "unready", "reason": admission.reason, **levels}, 503)
    return json_response({"status": "ready", **levels})


async def metrics_view(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (the deployment's stats, read from Redis)."""
    body = b""
    # The stats are left out (not faked) while Redis does not answer; ingest's own are
    # kept meanwhile and added once it answers again.
    with contextlib.suppress(redis.RedisError, OSError):
        body = await asyncio.to_thread(generate_latest, request.app[DEPLOYMENT])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def write_stats(r: aioredis.Redis) -> None:
    """Add ingest's request stats counted since the last time to the deployment's; kept
    for the next time if Redis does not take them."""
    counts = metrics.INGEST_STATS.drain()
    if not counts:
        return
    pipe = r.pipeline(transaction=True)  # all or none: a failed write is tried again whole
    status.stage_counts(pipe, counts)
    recent.stage_minute(pipe, metrics.answers_of(counts), time.time())
    try:
        await pipe.execute()
    except broker.QUEUE_ERRORS:
        metrics.INGEST_STATS.unsent(counts)


def _resources(
    settings: Settings, redis_url: str
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = redis_conn.async_client(settings, redis_url)
        fast = redis_conn.ANSWER_CONNECT_TIMEOUT_S  # /metrics and WAIT answer requests too
        sync = redis_conn.sync_client(settings, redis_url, socket_connect_timeout=fast)
        app[SYNC_REDIS] = sync
        app[DEPLOYMENT] = CollectorRegistry(auto_describe=False)
        app[DEPLOYMENT].register(metrics.DeploymentCollector(sync))
        # Its own client, never retrying (relay.ingest.publisher says why).
        acker = redis_conn.sync_client(
            settings, redis_url, socket_connect_timeout=fast, retry=False
        )
        publisher = ConfirmedPublisher(
            broker.AsyncQueue(app[REDIS], settings.message_events),
            acker,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        app[COMMIT] = GroupCommit(
            publisher.publish,
            flush_ms=settings.flush_ms,
            message_events=settings.message_events,
        )
        admission = app[ADMISSION]

        stop = asyncio.Event()

        async def watch() -> None:
            # Ends on `stop` as well as on cancellation: a cancellation that lands while
            # redis-py connects can be swallowed, and shutdown would wait for ever.
            while not stop.is_set():
                await admission.refresh(app[REDIS])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        async def stats_writer() -> None:
            # Never cancelled: a write cut off halfway would lose the stats it drained.
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), metrics.STATS_WRITE_S)
                if not stop.is_set():
                    await write_stats(app[REDIS])

        watcher = asyncio.create_task(watch())
        writer = asyncio.create_task(stats_writer())
        yield
        stop.set()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await writer  # at once, or once the write under way ends
        await app[COMMIT].close()
        with contextlib.suppress(TimeoutError):  # the last requests' stats, if Redis answers
            async with asyncio.timeout(READY_TIMEOUT_S):
                await write_stats(app[REDIS])
        await app[REDIS].aclose()
        sync.close()
        acker.close()

    return ctx


def create_app(settings: Settings, redis_url: str) -> web.Application:
    """The ingest application, bound to one Redis."""
    # Room above the body limits so an oversized body gets our 400, not aiohttp's 413;
    # each route applies its own limit while reading.
    largest = max(parsing.API_LIMITS.request_bytes, parsing.WEBHOOK_LIMITS.request_bytes)
    app = web.Application(client_max_size=largest + 1024)
    app[SETTINGS] = settings
    app[ADMISSION] = Admission(settings.max_queue_depth, settings.max_memory_fraction)
    app[REQUEST_LOG] = RequestLog(settings.ingest_log == "aggregate")
    app.cleanup_ctx.append(_resources(settings, redis_url))
    app.cleanup_ctx.append(app[REQUEST_LOG].summaries)
    # Segment's Actions webhook lets its user pick POST, PUT or PATCH.
    for method in ("POST", "PUT", "PATCH"):
        app.router.add_route(method, "/webhook", receive.webhook)
    app.router.add_post("/v1/{route}", receive.tracking_api)
    app.router.add_route("OPTIONS", "/v1/{route}", receive.tracking_api_preflight)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    openapi.add_routes(app)
    return app


async def serve(app: web.Application, *, ready: Callable[[], None] | None = None) -> None:
    """Run `app` (built by `create_app`) until cancelled or signalled (SIGINT/SIGTERM stop
    it cleanly)."""
    import signal

    settings = app[SETTINGS]
    # Bodies are decoded by parsing.decode_body, with its limits; aiohttp must not inflate
    # them first (a gzip bomb would be inflated before any limit applies).
    runner = web.AppRunner(app, auto_decompress=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Parsing a batch allocates thousands of short-lived objects; with the default
    # thresholds the cyclic GC ran every few hundred and rescanned the whole heap.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        # Stop taking connections, finish requests under way (their events get queued).
        await runner.cleanup()
