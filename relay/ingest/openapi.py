"""The ingest service's HTTP API as an OpenAPI 3.0.3 document, served at `/openapi.json`.

No schema is written here: the component schemas are generated from the pydantic types
the bodies are declared as (`events`, `bodies`), in OpenAPI 3.0's dialect of JSON Schema,
so a field is described once, where it is declared. What is written here is the route
table, built from the tables the server routes by (`parsing.SINGLE_ROUTES`,
`parsing.BATCH_ROUTES`) and listing every status each route answers, so that contract
tests can hold the server to it.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from relay import events
from relay.ingest import bodies, parsing

Schema = dict[str, Any]

REF = "#/components/schemas/{model}"
_JSON = "application/json"
_STRING: Schema = {"type": "string"}


class OpenAPI30Schema(GenerateJsonSchema):
    """pydantic's JSON Schema in OpenAPI 3.0's dialect: `nullable` instead of a null
    type, `enum` instead of `const`; titles on types, not on each field."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if "$ref" in inner:  # a reference takes no sibling keywords in 3.0
            return {"allOf": [inner], "nullable": True}
        return {**inner, "nullable": True}

    def literal_schema(self, schema: core_schema.LiteralSchema) -> JsonSchemaValue:
        out = super().literal_schema(schema)
        if "const" in out:
            out["enum"] = [out.pop("const")]
        return out

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


# The types the routes name; the schemas of the types they use come along.
DOCUMENTED: tuple[Any, ...] = (
    events.Event, bodies.BatchRequest, bodies.Selection, bodies.Accepted, bodies.Error,
    bodies.Liveness, bodies.Readiness, bodies.StatusReport, bodies.DeadLetterPage,
    bodies.Replayed, bodies.Purged, bodies.Preview, bodies.Trace, bodies.DryRunSummary,
    bodies.History, bodies.SearchHits,
)  # fmt: skip


def _call(schemas: Schema, kind: str) -> Schema:
    """The body of `/v1/<kind>`: that event, but its path sets `type`, and it may carry
    the write key."""
    event = schemas[schemas["Event"]["discriminator"]["mapping"][kind].rpartition("/")[2]]
    properties = {
        **event["properties"],
        "type": {**_STRING, "description": f"ignored: the path makes it `{kind}`"},
        "writeKey": schemas["BatchRequest"]["properties"]["writeKey"],
    }
    call = {**event, "title": f"{event['title']} call", "properties": properties}
    required = [name for name in call.pop("required") if name != "type"]
    return {**call, "required": required} if required else call


def _call_name(kind: str) -> str:
    return f"{kind.capitalize()}Call"


def components() -> Schema:
    """The schemas of the documented types, and of the tracking API's single calls."""
    mode: JsonSchemaMode = "validation"
    adapters = [(n, mode, TypeAdapter(t)) for n, t in enumerate(DOCUMENTED)]
    _, out = TypeAdapter.json_schemas(adapters, ref_template=REF, schema_generator=OpenAPI30Schema)
    schemas: Schema = out["$defs"]
    for kind in sorted(set(parsing.SINGLE_ROUTES.values())):
        schemas[_call_name(kind)] = _call(schemas, kind)
    return schemas


# --- the route table ---------------------------------------------------------------------


def _schema(documented: Any) -> Schema:
    """A reference to a documented type (or to a schema by name); a schema as it is."""
    if isinstance(documented, dict):
        return documented
    name = documented if isinstance(documented, str) else documented.__name__
    return {"$ref": REF.format(model=name)}


def _content(documented: Any, media_type: str = _JSON) -> Schema:
    return {media_type: {"schema": _schema(documented)}}


def _answer(description: str, documented: Any, media: str = _JSON) -> Schema:
    return {"description": description, "content": _content(documented, media)}


def _error(description: str) -> Schema:
    return _answer(description, bodies.Error)


def _param(name: str, where: str, schema: Schema, **extra: Any) -> Schema:
    return {"name": name, "in": where, "schema": schema, **extra}


def _operation(operation_id: str, summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"operationId": operation_id, "summary": summary, "responses": responses, **extra}


_EVENT = _schema(events.Event)
_TEXT = _content(_STRING, "text/plain")
# Every status an ingest route answers, chosen for what Segment's clients do with it:
# they drop a 400 and retry 408 and 503, honouring Retry-After.
_INGEST_RESPONSES: Schema = {
    "200": _answer("the events are durably in Redis", bodies.Accepted),
    "400": _error(
        "not JSON, not an event or batch, an invalid single event, or over a limit "
        "(32 KB per event, 500 KB per request, 2,500 events per batch); nothing queued"
    ),
    "401": _error("missing or invalid credentials; nothing queued"),
    "408": _error("the body took longer than 10 s to arrive; retry"),
    "503": {
        **_error("Redis unreachable, or the queue over its high-water mark"),
        "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
    },
}


def _ingest(operation_id: str, summary: str, body: Any, tag: str, **extra: Any) -> Schema:
    encodings = {"type": "string", "enum": ["gzip", "x-gzip", "identity"]}
    gzip = "`gzip` (analytics-python); the request limit applies after inflating too"
    # analytics.js posts its JSON as text/plain, which needs no CORS preflight.
    content = {**_content(body), **_content({**_STRING, "description": "JSON text"}, "text/plain")}
    return {"operationId": operation_id, "summary": summary, "tags": [tag],
            "parameters": [_param("Content-Encoding", "header", encodings, description=gzip)],
            "requestBody": {"required": True, "content": content},
            "responses": _INGEST_RESPONSES, **extra}  # fmt: skip


def _webhook() -> Schema:
    batch = {"type": "array", "items": _EVENT, "maxItems": parsing.WEBHOOK_LIMITS.batch_events}
    responses = {
        **_INGEST_RESPONSES,
        "200": _answer(
            "the events are durably in Redis; invalid or oversized (64 KB) events of an "
            "authenticated delivery are dead-lettered and listed in `rejected`, never refused",
            bodies.Accepted,
        ),
        "400": _error(
            "not JSON, not an event or array, or over a limit (8 MB per request after "
            "inflating, 8,000 events per batch: twice what Segment's Actions webhook sends)"
        ),
    }
    operation = _ingest(
        "webhook",
        "Segment Webhooks destination: one event, or an array when batching",
        {"anyOf": [_EVENT, batch]},
        "webhook",
        responses=responses,
        description="`X-Signature` is the hex HMAC-SHA1 of the body with the shared "
        "secret (for an array, of its first element's exact bytes). A write key as "
        "HTTP Basic username is accepted too. PUT and PATCH do the same as POST "
        "(Segment's Actions webhook lets its user pick the method).",
        security=[{"webhookSignature": []}, {"writeKey": []}],
    )
    methods = {"post": "webhook", "put": "webhook_put", "patch": "webhook_patch"}
    return {method: {**operation, "operationId": name} for method, name in methods.items()}


def _v1(route: str) -> Schema:
    kind = parsing.SINGLE_ROUTES.get(route)
    post = _ingest(
        f"v1_{route}",
        f"Segment HTTP Tracking API: {f'one {kind} call' if kind else 'a batch of events'}",
        _call_name(kind) if kind else bodies.BatchRequest,
        "tracking API",
        description="The write key goes as HTTP Basic username, or as `writeKey` in the "
        "body. A batch's invalid events are dead-lettered (`invalid_event`) and listed in "
        "`rejected`; an invalid single event is a 400. Client clocks are corrected as "
        "Segment does: timestamp = receivedAt - (sentAt - timestamp as sent), the sent "
        "one kept as `originalTimestamp`.",
        security=[{"writeKey": []}],
    )
    allowed = {"description": "the origin may post (CORS headers in the answer)"}
    refused = _error("the origin is not in RELAY_CORS_ORIGINS")
    preflight = _operation(
        f"v1_{route}_preflight", "CORS preflight of a browser (analytics.js)",
        {"204": allowed, "403": refused}, tags=["tracking API"],
        parameters=[_param("Origin", "header", _STRING, required=True)],
    )  # fmt: skip
    return {"post": post, "options": preflight}


_ADMIN_OFF = _error("the admin API is off (RELAY_ADMIN_TOKEN unset)")
_ADMIN_400 = {"description": "a bad query or selection", "content": _content(bodies.Error) | _TEXT}
_TOO_BIG = {"description": "body over the server's size limit", "content": _TEXT}


def _admin_api(
    method: str, operation_id: str, summary: str, answer: Any, media: str = _JSON, **extra: Any
) -> Schema:
    """An admin API operation: `answer` (of `media`), or the refusals every one has (no
    token, the API off, and for one with a body, a bad or oversized body), or its own
    `errors`."""
    responses = {"200": _answer(summary, answer, media), "404": _ADMIN_OFF,
                 "401": _error("missing or invalid bearer token")}  # fmt: skip
    if "requestBody" in extra:
        responses |= {"400": _ADMIN_400, "413": _TOO_BIG}
    responses |= extra.pop("errors", {})
    operation = _operation(operation_id, summary, responses, **extra)
    return {method: {**operation, "tags": ["admin"], "security": [{"adminToken": []}]}}


def _admin() -> Schema:
    limit = {"type": "integer", "minimum": 0, "maximum": 500, "default": 50}
    listing = [_param("reason", "query", bodies.REASON_SCHEMA), _param("limit", "query", limit),
               _param("offset", "query", {"type": "integer", "minimum": 0})]  # fmt: skip
    by_id = [_param("id", "path", _STRING, required=True)]
    source = _param("source", "query", {"type": "string", "enum": ["api", "webhook"]})
    some = {"anyOf": [_EVENT, {"type": "array", "items": _EVENT}, _schema(bodies.BatchRequest)]}
    selection = {"required": True, "content": _content(bodies.Selection)}
    outcome = {"type": "string", "enum": ["delivered", "skipped", "dead"]}
    tail = [_param("user", "query", _STRING), _param("outcome", "query", outcome)]
    page = _answer("the page (it asks for the token)", _STRING, "text/html")
    found = [
        _param(name, "query", _STRING)
        for name in (
            "message_id",
            "user",
            "anonymous_id",
            "account",
            "event",
            "reason",
            "since",
            "until",
        )
    ]
    found += [
        _param("outcome", "query", outcome),
        _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),
    ]
    return {
        "/admin": {"get": _operation("admin_page", "status page",
                                     {"200": page, "404": _ADMIN_OFF}, tags=["admin"])},
        "/admin/api/status": _admin_api(
            "get", "admin_status", "status report", bodies.StatusReport),
        "/admin/api/dlq": _admin_api(
            "get", "admin_dlq_list", "a page of dead letters, newest first",
            bodies.DeadLetterPage, parameters=listing, errors={"400": _ADMIN_400}),
        "/admin/api/dlq/{id}": _admin_api(
            "get", "admin_dlq_show", "one dead letter", bodies.DeadLetter, parameters=by_id,
            errors={"404": _error("no such dead letter, or the admin API is off")}),
        "/admin/api/dlq/replay": _admin_api(
            "post", "admin_dlq_replay", "dead letters sent through delivery again",
            bodies.Replayed, requestBody=selection,
            errors={"503": _error("could not queue the events")}),
        "/admin/api/dlq/purge": _admin_api(
            "post", "admin_dlq_purge", "dead letters deleted", bodies.Purged,
            requestBody=selection),
        "/admin/api/preview": _admin_api(
            "post", "admin_preview",
            "the ChurnZero commands these events would produce now (nothing is sent)",
            bodies.Preview, parameters=[source],
            requestBody={"required": True, "content": _content(some)}),
        "/admin/api/trace/{id}": _admin_api(
            "get", "admin_trace", "where the event with this messageId (or relay id) is",
            bodies.Trace, parameters=by_id),
        "/admin/api/dlq/summary": _admin_api(
            "post", "admin_dlq_summary",
            "the dry run of a bulk replay or purge: counts by reason, event and outcome",
            bodies.DryRunSummary, requestBody=selection),
        "/admin/api/search": _admin_api(
            "get", "admin_search",
            "archived events by id, user, account, event, outcome, reason and time "
            "(since/until: `2h`, `7d` ago, ISO 8601 or unix seconds)",
            bodies.SearchHits, parameters=found, errors={"400": _ADMIN_400}),
        "/admin/api/history": _admin_api(
            "get", "admin_history", "an hour of ingested and delivered counts", bodies.History),
        "/admin/api/tail": _admin_api(
            "get", "admin_tail",
            "server-sent events: a `data:` line of JSON per event settled from now on",
            _STRING, "text/event-stream", parameters=tail, errors={"400": _ADMIN_400, "503": _error(
                "too many live panels open, or Redis unreachable")}),
        "/admin/favicon.svg": {"get": _operation(
            "admin_favicon", "the page's icon",
            {"200": _answer("the icon", _STRING, "image/svg+xml"), "404": _ADMIN_OFF},
            tags=["admin"])},
    }  # fmt: skip


def _paths() -> Schema:
    paths: Schema = {"/webhook": _webhook()}
    for route in sorted([*parsing.SINGLE_ROUTES, *parsing.BATCH_ROUTES]):
        paths[f"/v1/{route}"] = _v1(route)
    ready = {"200": _answer("ready", bodies.Readiness),
             "503": _answer("not ready: see reason", bodies.Readiness)}  # fmt: skip
    probes = {
        "/livez": ("livez", "the process answers", {"200": _answer("alive", bodies.Liveness)}),
        "/readyz": ("readyz", "Redis answers and the queue is under its high-water mark", ready),
        "/metrics": ("metrics", "Prometheus metrics",
                     {"200": _answer("Prometheus text exposition format", _STRING, "text/plain")}),
        "/openapi.json": ("openapi", "this document",
                          {"200": _answer("OpenAPI 3.0.3", {"type": "object"})}),
    }  # fmt: skip
    paths.update({path: {"get": _operation(*operation)} for path, operation in probes.items()})
    return paths | _admin()


SPEC: Schema = {
    "openapi": "3.0.3",
    "info": {
        "title": "churnzero-relay ingest",
        "version": "0.1.0",
        "description": "Segment events in, ChurnZero commands out. Any other path, an "
        "unknown /v1/<route> included, answers 404; a method a path does not take, 405.",
    },
    "tags": [{"name": "webhook"}, {"name": "tracking API"}, {"name": "admin"}],
    "paths": _paths(),
    "components": {
        "securitySchemes": {
            "writeKey": {"type": "http", "scheme": "basic", "description": "key as username"},
            "webhookSignature": {"type": "apiKey", "in": "header", "name": "X-Signature"},
            "adminToken": {"type": "http", "scheme": "bearer", "description": "admin token"},
        },
        "schemas": components(),
    },
}
_BODY = orjson.dumps(SPEC)


async def openapi_view(_: web.Request) -> web.Response:
    """GET /openapi.json: this API's OpenAPI document."""
    return web.Response(body=_BODY, content_type=_JSON)


def add_routes(app: web.Application) -> None:
    """Mount `GET /openapi.json` on the ingest app."""
    app.router.add_get("/openapi.json", openapi_view)
