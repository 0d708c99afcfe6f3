"""The ChurnZero sandbox: a stand-in for ChurnZero's HTTP API endpoint `/i`.

Like ChurnZero, `/i` takes a GET query, a form POST, a JSON object or a JSON array of
commands, and answers 200 with a 1x1 GIF to all of it, garbage included: ChurnZero
reports no errors. What it received is kept for inspection, and faults that the
gateways and networks in front of ChurnZero produce (429, 5xx, latency, dropped
connections) can be injected:

    GET    /_sandbox/commands   every command accepted, in arrival order; DELETE clears
                                commands, the request log and stats
    GET    /_sandbox/requests   every request to /i: {"t", "status", "commands", "method"};
                                status 0 means the connection was dropped unanswered
    GET    /_sandbox/stats      {"requests", "by_status", "commands", "unparseable",
                                "unverified"}
    POST   /_sandbox/faults     replace the fault set, e.g. {"status": 503, "for_s": 10};
                                `for_s` bounds the whole set; GET shows it, DELETE clears it
    GET    /_sandbox/tenant     {"eiv": true} in strict mode (what `relay check` asks)
    GET    /healthz             "ok"

Misconfigurations a relay must notice, as faults: `{"redirect": 301, "location": URL}`
answers a redirect (what a moved or mistyped endpoint does), `{"html": true}` answers 200
with an HTML page (what a proxy or captive portal does).

Strict mode (`eiv_secret`): like a ChurnZero tenant with Enhanced Identity Verification
on, commands without the right `accountExternalIdHash`/`contactExternalIdHash` are
answered 200 like any other and silently dropped (counted as `unverified`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Self, TypedDict
from urllib.parse import parse_qsl

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from relay import eiv

# The transparent 1x1 GIF89a that tracking pixels, ChurnZero's included, answer with.
_PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_FORM = "application/x-www-form-urlencoded"
_PORTAL = "<!doctype html><title>Sign in to the network</title><p>Please accept the terms."
_DROPPED = 0


def json_response(body: Any, status: int = 200) -> web.Response:
    """`body` as a JSON answer (orjson: the command list can be large)."""
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class _Faults(BaseModel):
    """Failure injection for `/i`; every key is optional and they combine."""

    # strict: `true` must not pass as status 1, nor "503" as a number.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    status: Annotated[int, Field(ge=400, le=599)] | None = None
    retry_after: Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0)] | str | None = None
    for_s: Annotated[float, Field(gt=0)] | None = None
    rate_limit_rps: Annotated[float, Field(gt=0)] | None = None
    latency_ms: Annotated[float, Field(ge=0)] | None = None
    drop_connection: bool = False
    redirect: Annotated[int, Field(ge=300, le=399)] | None = None
    location: str | None = None
    html: bool = False

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after needs a status")
        if self.location is not None and self.redirect is None:
            raise ValueError("location needs a redirect")
        faults = (self.status, self.rate_limit_rps, self.latency_ms, self.redirect)
        flags = self.drop_connection or self.html
        if self.for_s is not None and not flags and all(f is None for f in faults):
            raise ValueError("for_s needs a fault to time")
        return self


class _RequestEntry(TypedDict):
    """One request to `/i` as the request log shows it."""

    t: float
    status: int
    commands: int
    method: str


@dataclass
class _State:
    """What the sandbox received, and the faults in force."""

    record: bool
    eiv_secret: str | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    requests: list[_RequestEntry] = field(default_factory=list)
    by_status: dict[int, int] = field(default_factory=dict)
    request_count: int = 0
    command_count: int = 0
    unparseable: int = 0
    unverified: int = 0
    faults: _Faults = field(default_factory=_Faults)
    faults_until: float | None = None
    tokens: float = 0.0
    tokens_at: float = 0.0

    def clear_received(self) -> None:
        """Forget commands, the request log and stats."""
        self.commands.clear()
        self.requests.clear()
        self.by_status.clear()
        self.request_count = self.command_count = self.unparseable = self.unverified = 0

    def set_faults(self, faults: _Faults) -> None:
        """Replace the fault set; the rate limiter starts with a full burst."""
        now = time.monotonic()
        self.faults = faults
        self.faults_until = now + faults.for_s if faults.for_s is not None else None
        self.tokens = max(faults.rate_limit_rps or 0.0, 1.0)
        self.tokens_at = now

    def current_faults(self) -> _Faults:
        """The fault set in force now (an expired one is cleared)."""
        if self.faults_until is not None and time.monotonic() >= self.faults_until:
            self.set_faults(_Faults())
        return self.faults

    def admit(self, rps: float) -> bool:
        """Token bucket, burst = rps: a client pacing at exactly rps is never refused."""
        now = time.monotonic()
        burst = max(rps, 1.0)
        self.tokens = min(burst, self.tokens + (now - self.tokens_at) * rps)
        self.tokens_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


_STATE = web.AppKey("sandbox_state", _State)


def _parse_commands(
    method: str, query_string: str, content_type: str, charset: str | None, body: bytes
) -> tuple[list[dict[str, Any]], int]:
    """The commands in one request to `/i`, and how many parts could not be parsed."""
    if method != "POST" or not body.strip():
        # A query alone still says something; no query and no body say nothing.
        pairs = parse_qsl(query_string, keep_blank_values=True)
        return ([dict(pairs)] if pairs else []), 0
    if content_type == _FORM:
        try:
            text = body.decode(charset or "utf-8", "replace")
        except LookupError:  # a charset nobody knows: ChurnZero would still answer 200
            text = body.decode("utf-8", "replace")
        pairs = parse_qsl(text, keep_blank_values=True)
        return ([dict(pairs)], 0) if pairs else ([], 1)
    # Anything but a form is tried as JSON: clients post JSON as text/plain or untyped,
    # and ChurnZero answers 200 whatever the type.
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [], 1
    items = parsed if isinstance(parsed, list) else [parsed]
    commands = [item for item in items if isinstance(item, dict)]
    return commands, len(items) - len(commands)


routes = web.RouteTableDef()


@routes.get("/i")
@routes.post("/i")
async def _track(request: web.Request) -> web.StreamResponse:
    """`/i`: like ChurnZero, 200 and a pixel, unless a fault says otherwise."""
    received = time.time()
    state = request.app[_STATE]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        _log(state, received, exc.status, 0, request.method)
        raise
    commands, unparseable = _parse_commands(
        request.method, request.query_string, request.content_type, request.charset, body
    )
    faults = state.current_faults()
    response: web.Response | None
    if faults.drop_connection:
        response = None
    elif faults.status is not None:
        response = _refusal(faults.status, faults.retry_after)
    elif faults.redirect is not None:
        location = faults.location or "https://analytics.churnzero.net/i"
        response = web.Response(status=faults.redirect, headers={"Location": location})
    elif faults.html:
        response = web.Response(text=_PORTAL, content_type="text/html")
    elif faults.rate_limit_rps is not None and not state.admit(faults.rate_limit_rps):
        response = _refusal(HTTPStatus.TOO_MANY_REQUESTS, 1)
    else:
        response = web.Response(body=_PIXEL, content_type="image/gif")
    status = response.status if response is not None else _DROPPED

    _log(state, received, status, len(commands), request.method)
    # Only ChurnZero's own 200 accepts; a gateway refusal or a portal page never reached it.
    if status == HTTPStatus.OK and not faults.html:
        if state.eiv_secret is not None:
            kept = [c for c in commands if eiv.verified(c, state.eiv_secret)]
            state.unverified += len(commands) - len(kept)
            commands = kept
        state.command_count += len(commands)
        state.unparseable += unparseable
        if state.record:
            state.commands.extend(commands)

    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    if response is None:
        # No status line, no bytes: the client sees the server hang up.
        if request.transport is not None:
            request.transport.close()
        return web.Response()
    return response


def _log(state: _State, received: float, status: int, commands: int, method: str) -> None:
    """Count one request to `/i`, and log it when recording."""
    state.request_count += 1
    state.by_status[status] = state.by_status.get(status, 0) + 1
    if state.record:
        state.requests.append(
            _RequestEntry(t=received, status=status, commands=commands, method=method)
        )


def _refusal(status: int, retry_after: float | str | None) -> web.Response:
    """What a gateway in front of ChurnZero answers when it refuses a request."""
    headers: dict[str, str] = {}
    if retry_after is not None:
        is_whole = isinstance(retry_after, float) and retry_after.is_integer()
        headers["Retry-After"] = str(int(retry_after) if is_whole else retry_after)
    try:
        text = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        text = str(status)
    return web.Response(status=status, text=text, headers=headers)


@routes.get("/_sandbox/commands")
async def _get_commands(request: web.Request) -> web.Response:
    """Every command accepted, in arrival order."""
    return json_response(request.app[_STATE].commands)


@routes.delete("/_sandbox/commands")
async def _delete_commands(request: web.Request) -> web.Response:
    """Forget commands, the request log and stats (faults stay)."""
    request.app[_STATE].clear_received()
    return json_response({"cleared": True})


@routes.get("/_sandbox/requests")
async def _get_requests(request: web.Request) -> web.Response:
    """Every request to `/i`, in arrival order."""
    return json_response(request.app[_STATE].requests)


@routes.get("/_sandbox/stats")
async def _get_stats(request: web.Request) -> web.Response:
    """Counters that are kept even when recording is off."""
    state = request.app[_STATE]
    return json_response(
        {
            "requests": state.request_count,
            "by_status": {str(k): v for k, v in sorted(state.by_status.items())},
            "commands": state.command_count,
            "unparseable": state.unparseable,
            "unverified": state.unverified,
        }
    )


@routes.get("/_sandbox/faults")
async def _get_faults(request: web.Request) -> web.Response:
    """The fault set in force, as it was posted."""
    faults = request.app[_STATE].current_faults()
    return json_response(faults.model_dump(exclude_defaults=True))


@routes.post("/_sandbox/faults")
async def _post_faults(request: web.Request) -> web.Response:
    """Replace the fault set; 400 naming the problem when it is not a valid one."""
    try:
        faults = _Faults.model_validate_json(await request.read())
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        ]
        return json_response({"error": "; ".join(problems)}, status=400)
    request.app[_STATE].set_faults(faults)
    return json_response(faults.model_dump(exclude_defaults=True))


@routes.delete("/_sandbox/faults")
async def _delete_faults(request: web.Request) -> web.Response:
    """Clear every fault."""
    request.app[_STATE].set_faults(_Faults())
    return json_response({})


@routes.get("/_sandbox/tenant")
async def _get_tenant(request: web.Request) -> web.Response:
    """What a ChurnZero tenant would show its admin: whether it verifies identities (EIV)."""
    return json_response({"eiv": request.app[_STATE].eiv_secret is not None})


@routes.get("/healthz")
async def _healthz(_: web.Request) -> web.Response:
    """Liveness for whoever started the sandbox."""
    return web.Response(text="ok")


def create_app(*, record: bool = True, eiv_secret: str | None = None) -> web.Application:
    """The sandbox app; with `record=False` only stats are kept (for long benchmarks);
    with `eiv_secret`, commands without the right EIV hashes are dropped."""
    # ChurnZero does not publish a size limit; 4 MiB is ASP.NET's default request limit,
    # far above any sane batch of commands.
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app[_STATE] = _State(record=record, eiv_secret=eiv_secret)
    app.add_routes(routes)
    return app


async def start(host: str, port: int, *, record: bool = True) -> web.AppRunner:
    """Serve the sandbox in the running loop; the caller awaits `runner.cleanup()`."""
    # Access logs would cost more than the sandbox itself under benchmark load.
    runner = web.AppRunner(create_app(record=record), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run(host: str, port: int, *, eiv_secret: str | None = None) -> None:
    """Serve the sandbox until interrupted (the `relay sandbox` command)."""
    web.run_app(
        create_app(eiv_secret=eiv_secret),
        host=host,
        port=port,
        access_log=None,
        print=lambda _: print(f"ChurnZero sandbox on http://{host}:{port}/i", flush=True),
    )
