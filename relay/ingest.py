"""The ingest service: Segment events in over HTTP, durably into Redis, answered fast.

`create_app(settings, redis_url)` builds the aiohttp application. Routes:
`POST /webhook` (Segment's Webhooks destination), the tracking API under `/v1/`,
`/livez`, `/readyz`, `/metrics`, and the admin API under `/admin/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from celery import Celery
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay import (
    admin,
    auth,
    broker,
    cors,
    deadletter,
    intake,
    keys,
    metrics,
    openapi,
    redis_conn,
    requestlog,
    status,
)
from relay.publisher import GroupCommit
from relay.settings import Settings

log = structlog.get_logger("relay.ingest")

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
SYNC_REDIS = web.AppKey("sync_redis", redis.Redis)
CELERY = web.AppKey("celery", Celery)
COMMIT = web.AppKey("commit", GroupCommit)
GATE: web.AppKey[QueueGate]
DEPLOYMENT = web.AppKey("deployment", CollectorRegistry)

RETRY_AFTER_S = 5
# Redis bytes per byte of decoded request body: a queued event is its JSON inside kombu's
# envelope, base64-encoded (measured about 1.4); 2 leaves margin.
REDIS_BYTES_PER_BODY_BYTE = 2
BODY_TIMEOUT_S = 10  # a client slower than this to send its body gets 408 (Segment retries it)


class QueueGate:
    """Whether ingest may accept: Redis answers, the backlog is under the high-water mark
    and Redis's memory under its threshold. Refreshed in the background so requests never
    wait on the check."""

    def __init__(self, limit: int, max_memory_fraction: float = 1.0) -> None:
        self.limit = limit
        self.max_memory_fraction = max_memory_fraction
        self.waiting = 0
        self.used_memory = 0
        self.maxmemory = 0  # 0: unlimited, only the queue depth applies
        self.redis_ok = True
        self.reason = ""
        # Bytes this process queued since the last reading: between two readings a burst
        # could otherwise run past the threshold, up to maxmemory.
        self._queued_bytes = 0

    def queued(self, body_bytes: int) -> None:
        """Count a request body queued since the last reading."""
        self._queued_bytes += body_bytes * REDIS_BYTES_PER_BODY_BYTE
        if self.maxmemory and self.memory_fraction >= self.max_memory_fraction:
            self.reason = self._memory_reason()

    @property
    def memory_fraction(self) -> float:
        """Redis used_memory (plus what was queued since) / maxmemory; 0 when unlimited."""
        if not self.maxmemory:
            return 0.0
        return (self.used_memory + self._queued_bytes) / self.maxmemory

    @property
    def open(self) -> bool:
        """Accepting new events."""
        return (
            self.redis_ok
            and self.waiting <= self.limit
            and self.memory_fraction < self.max_memory_fraction
        )

    async def refresh(self, r: aioredis.Redis) -> None:
        """Read the backlog and Redis's memory once."""
        try:
            pipe = r.pipeline(transaction=False)
            pipe.get(keys.DEPTH_READY)
            pipe.get(keys.DELAYED_EVENTS)
            pipe.llen(keys.QUEUE)
            pipe.llen(keys.REPLAY_QUEUE)
            pipe.info("memory")
            counted = self._queued_bytes
            ready, delayed, live, replay, memory = await pipe.execute()
            self.waiting = status.backlog(ready, delayed, int(live) + int(replay))
            self.used_memory = int(memory.get("used_memory", 0))
            self.maxmemory = int(memory.get("maxmemory", 0))
            self._queued_bytes -= counted  # now inside used_memory
            self.redis_ok = True
        except (redis.RedisError, OSError) as exc:
            self.redis_ok = False
            self.reason = type(exc).__name__
        if not self.redis_ok:
            self.reason = "redis unreachable"
        elif self.memory_fraction >= self.max_memory_fraction:
            self.reason = self._memory_reason()
        elif self.waiting > self.limit:
            self.reason = f"queue over its high-water mark ({self.waiting} > {self.limit})"

    def _memory_reason(self) -> str:
        # Refused well before maxmemory: with noeviction a full Redis refuses every write,
        # and the workers need the headroom to drain it (README "Redis full").
        return (
            f"redis memory at {self.memory_fraction:.0%} of maxmemory "
            f"(threshold {self.max_memory_fraction:.0%})"
        )


GATE = web.AppKey("gate", QueueGate)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _unavailable(reason: str) -> web.Response:
    return _json(503, {"error": f"unavailable: {reason}"}, {"Retry-After": str(RETRY_AFTER_S)})


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _read_raw(request: web.Request, limits: intake.Limits) -> bytes:
    limit = limits.request_bytes
    too_big = f"request body is larger than {intake.size_text(limit)}"
    if (request.content_length or 0) > limit:
        raise intake.BadRequest(too_big)
    try:
        if request.content.is_eof():  # the whole body came with the headers: no wait
            body = await request.read()
        else:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise intake.BadRequest(too_big) from None
    except TimeoutError:
        raise _Refused(_json(408, {"error": "request body took too long"})) from None
    if len(body) > limit:
        raise intake.BadRequest(too_big)
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
    raise _Refused(_json(401, {"error": f"missing or invalid {what}"}))


def _check_api_auth(settings: Settings, request: web.Request, body_key: str | None) -> None:
    if not settings.authenticated:
        return
    username = auth.basic_username(request.headers.get("Authorization"))
    if auth.known_key(username, settings.write_keys) or auth.known_key(
        body_key, settings.write_keys
    ):
        return
    raise _Refused(_json(401, {"error": "missing or invalid write key"}))


# Relay ids: unique per process by a random prefix, then a counter; uuid4 per event cost a
# system call each, a tenth of ingest's time on batches.
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def _items(accepted: list[dict[str, Any]], source: str, now: float) -> list[dict[str, Any]]:
    return [
        {"id": _new_id(), "source": source, "received_at": now, "attempts": 0, "event": e}
        for e in accepted
    ]


async def _ingest(request: web.Request, route: str, source: str) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    started = time.perf_counter()
    outcome: dict[str, Any] = {"route": route}
    try:
        response = await _handle(request, route, source, settings, outcome)
    except _Refused as refused:
        response = refused.response
    except intake.BadRequest as exc:
        response = _json(400, {"error": str(exc)})
        outcome["error"] = str(exc)
    elapsed = time.perf_counter() - started
    metrics.ingest_requests(route, response.status).inc()
    metrics.ingest_duration(route).observe(elapsed)
    app[requestlog.REQUEST_LOG].record(response.status, elapsed * 1000, outcome)
    return response


async def _handle(
    request: web.Request, route: str, source: str, settings: Settings, outcome: dict[str, Any]
) -> web.Response:
    app = request.app
    gate = app[GATE]
    if not gate.open:
        return _unavailable(gate.reason)
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
            {"id": _new_id(), "source": source, "received_at": stamp, "attempts": 0,
             "event": r.event},
            "invalid_event",
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
        return _unavailable("could not queue the events")
    outcome.update(accepted=len(items), rejected=len(rejected))
    label = "webhook" if route == "webhook" else "api"
    metrics.ingest_events(label, "accepted").inc(len(items))
    if parsed.timestamp_fallbacks:
        outcome["timestamp_fallbacks"] = parsed.timestamp_fallbacks
        metrics.INGEST_TIMESTAMP_FALLBACKS.labels(label).inc(parsed.timestamp_fallbacks)
    if rejected:
        metrics.ingest_events(label, "rejected").inc(len(rejected))
        return _json(
            200,
            {
                "success": True,
                "accepted": len(items),
                "rejected": [{"index": r.index, "errors": r.errors} for r in parsed.rejected],
            },
        )
    return _json(200, {"success": True})


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
        return _json(403, {"error": f"origin not allowed: {origin} (see RELAY_CORS_ORIGINS)"})
    return web.Response(status=204, headers=headers)


async def livez(_: web.Request) -> web.Response:
    """GET /livez: the process answers (no dependencies checked)."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: Redis answers, the queue is under its high-water mark and Redis's
    memory under RELAY_MAX_MEMORY_FRACTION of maxmemory."""
    gate = request.app[GATE]
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), timeout=2)
        await gate.refresh(request.app[REDIS])
    except (redis.RedisError, OSError, TimeoutError):
        gate.redis_ok, gate.reason = False, "redis unreachable"
    figures = {"waiting": gate.waiting, "memory_fraction": round(gate.memory_fraction, 4)}
    if not gate.open:
        return _json(503, {"status": "unready", "reason": gate.reason, **figures})
    return _json(200, {"status": "ready", **figures})


async def metrics_view(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (deployment figures read from Redis)."""
    body = generate_latest(metrics.REGISTRY)
    # The deployment's figures are left out (not faked) while Redis does not answer.
    with contextlib.suppress(redis.RedisError, OSError):
        body += await asyncio.to_thread(generate_latest, request.app[DEPLOYMENT])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _resources(
    settings: Settings, redis_url: str, celery: Celery | None
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[REDIS] = redis_conn.async_client(settings, redis_url)
        sync = redis_conn.sync_client(settings, redis_url)
        app[SYNC_REDIS] = sync
        app[CELERY] = celery or broker.make_celery(settings, redis_url)
        app[DEPLOYMENT] = CollectorRegistry(auto_describe=False)
        app[DEPLOYMENT].register(metrics.DeploymentCollector(sync))
        # Its own client, never retrying: a retry could land on a newly promoted primary
        # and have WAIT confirm writes that died with the old one.
        acker = redis_conn.sync_client(settings, redis_url, retry=False)
        pipelined = broker.AsyncQueue(app[REDIS], settings.message_events)

        async def publish_confirmed(items: list[dict[str, Any]]) -> None:
            await pipelined.publish(items)  # the messages and their counts, in one call
            if settings.redis_wait_replicas:
                await asyncio.to_thread(
                    broker.confirm_replicated, acker,
                    settings.redis_wait_replicas, settings.redis_wait_timeout_ms,
                )  # fmt: skip

        app[COMMIT] = GroupCommit(
            app[CELERY],
            flush_ms=settings.flush_ms,
            message_events=settings.message_events,
            after_publish=partial(
                broker.count_sent,
                acker,
                wait_replicas=settings.redis_wait_replicas,
                wait_timeout_ms=settings.redis_wait_timeout_ms,
            ),
            publish=publish_confirmed if settings.ingest_publisher == "pipelined" else None,
        )
        gate = app[GATE]

        async def watch() -> None:
            while True:
                await gate.refresh(app[REDIS])
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await asyncio.to_thread(app[COMMIT].close)
        await app[REDIS].aclose()
        sync.close()
        acker.close()

    return ctx


def create_app(
    settings: Settings, redis_url: str, *, celery: Celery | None = None
) -> web.Application:
    """The ingest application, bound to one Redis."""
    # Room above the body limits so an oversized body gets our 400, not aiohttp's 413;
    # each route applies its own limit while reading.
    largest = max(intake.API_LIMITS.request_bytes, intake.WEBHOOK_LIMITS.request_bytes)
    app = web.Application(client_max_size=largest + 1024)
    app[SETTINGS] = settings
    app[GATE] = QueueGate(settings.max_queue_depth, settings.max_memory_fraction)
    app[requestlog.REQUEST_LOG] = requestlog.RequestLog(settings.ingest_log == "aggregate")
    app.cleanup_ctx.append(_resources(settings, redis_url, celery))
    app.cleanup_ctx.append(requestlog.summaries)
    # Segment's Actions webhook lets its user pick POST, PUT or PATCH.
    for method in ("POST", "PUT", "PATCH"):
        app.router.add_route(method, "/webhook", webhook)
    app.router.add_post("/v1/{route}", tracking_api)
    app.router.add_route("OPTIONS", "/v1/{route}", tracking_api_preflight)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    admin.add_routes(app)
    openapi.add_routes(app)
    return app


async def serve(
    settings: Settings, redis_url: str, *, ready: Callable[[], None] | None = None
) -> None:
    """Run ingest until cancelled or signalled (SIGINT/SIGTERM stop it cleanly)."""
    import signal

    # Bodies are decoded by intake.decode_body, with its limits; aiohttp must not inflate
    # them first (a gzip bomb would be inflated before any limit applies).
    runner = web.AppRunner(create_app(settings, redis_url), auto_decompress=False, access_log=None)
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
