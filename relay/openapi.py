"""The ingest service's HTTP API as an OpenAPI 3.0.3 document, served at `/openapi.json`.

Built in code from the tables the server routes by (`intake.SINGLE_ROUTES`,
`intake.BATCH_ROUTES`, `events.EVENT_TYPES`, `reasons.Reason`), so a route added
there is described here. Request schemas are permissive (Segment sends keys nobody
lists) but typed for the fields the relay reads; responses list every status the
server answers on each route, so contract tests can hold it to them.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from relay import events, intake
from relay.reasons import Reason

Schema = dict[str, Any]

_JSON = "application/json"
_STRING: Schema = {"type": "string"}
_INTEGER: Schema = {"type": "integer"}
_OBJECT: Schema = {"type": "object", "additionalProperties": True}
_STRING_OR_NUMBER: Schema = {"anyOf": [_STRING, {"type": "number"}]}
_REASON: Schema = {"type": "string", "enum": [reason.value for reason in Reason]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: Schema, *required: str, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = list(required)
    return out


def _content(schema: Schema, media_type: str = _JSON) -> Schema:
    return {media_type: {"schema": schema}}


def _response(description: str, schema: Schema, media_type: str = _JSON) -> Schema:
    return {"description": description, "content": _content(schema, media_type)}


def _event(kind: str | None) -> Schema:
    """A Segment event; `kind` set: the body of `/v1/<kind>`, whose path fixes `type`."""
    properties: Schema = {
        "type": {"type": "string", "enum": list(events.EVENT_TYPES)},
        "userId": _STRING_OR_NUMBER,
        "anonymousId": _STRING_OR_NUMBER,
        "messageId": _STRING_OR_NUMBER,
        "event": {"type": "string", "description": "a track call's event name"},
        "timestamp": {
            **_STRING_OR_NUMBER,
            "description": "ISO-8601 with any offset, or epoch milliseconds (default: receipt)",
        },
        "traits": _OBJECT,
        "properties": _OBJECT,
        "context": _OBJECT,
        "integrations": {
            **_OBJECT,
            "description": "`ChurnZero: false` (or `Churnzero: false`) skips the event; "
            "so does `All: false` on /v1/* unless ChurnZero is enabled",
        },
        "version": {},
        "writeKey": {**_STRING, "description": "on /v1/*, instead of HTTP Basic; never stored"},
    }
    if kind is not None:
        properties["type"] = {**_STRING, "description": f"ignored: the path makes it `{kind}`"}
    required = ["type"] if kind is None else ["event"] if kind == "track" else []
    return _object(properties, *required, additionalProperties=True)


def _ingest_body(schema: Schema) -> Schema:
    # analytics.js posts its JSON as text/plain, which needs no CORS preflight.
    text = {**_STRING, "description": "JSON text"}
    return {"required": True, "content": {**_content(schema), **_content(text, "text/plain")}}


_CONTENT_ENCODING: Schema = {
    "name": "Content-Encoding",
    "in": "header",
    "description": "`gzip` (analytics-python); the request limit applies after inflating too",
    "schema": {"type": "string", "enum": ["gzip", "x-gzip", "identity"]},
}
# Every status an ingest route answers, chosen for what Segment's clients do with it:
# they drop a 400 and retry 408 and 503, honouring Retry-After.
_INGEST_RESPONSES: Schema = {
    "200": _response("the events are durably in Redis", _ref("Accepted")),
    "400": _response(
        "not JSON, not an event or batch, an invalid single event, or over a limit "
        "(32 KB per event, 500 KB per request, 2,500 events per batch); nothing queued",
        _ref("Error"),
    ),
    "401": _response("missing or invalid credentials; nothing queued", _ref("Error")),
    "408": _response("the body took longer than 10 s to arrive; retry", _ref("Error")),
    "503": {
        **_response("Redis unreachable, or the queue over its high-water mark", _ref("Error")),
        "headers": {"Retry-After": {"description": "seconds", "schema": _INTEGER}},
    },
}


_WEBHOOK_RESPONSES: Schema = {
    **_INGEST_RESPONSES,
    "200": _response(
        "the events are durably in Redis; invalid or oversized (64 KB) events of an "
        "authenticated delivery are dead-lettered and listed in `rejected`, never refused",
        _ref("Accepted"),
    ),
    "400": _response(
        "not JSON, not an event or array, or over a limit (8 MB per request after "
        "inflating, 8,000 events per batch: twice what Segment's Actions webhook sends)",
        _ref("Error"),
    ),
}


def _ingest(
    operation_id: str,
    tag: str,
    summary: str,
    body: Schema,
    methods: tuple[str, ...] = ("post",),
    responses: Schema = _INGEST_RESPONSES,
    **extra: Any,
) -> Schema:
    request = {"parameters": [_CONTENT_ENCODING], "requestBody": _ingest_body(body)}
    out = {}
    for method in methods:
        suffix = "" if method == "post" else f"_{method}"
        operation = {"operationId": operation_id + suffix, "tags": [tag], "summary": summary}
        out[method] = {**operation, **request, "responses": responses, **extra}
    return out


def _preflight(route: str) -> Schema:
    origin = {"name": "Origin", "in": "header", "required": True, "schema": _STRING}
    allowed = {"description": "the origin may post (CORS headers in the answer)"}
    refused = _response("the origin is not in RELAY_CORS_ORIGINS", _ref("Error"))
    return {
        "operationId": f"v1_{route}_preflight",
        "tags": ["tracking API"],
        "summary": "CORS preflight of a browser (analytics.js)",
        "parameters": [origin],
        "responses": {"204": allowed, "403": refused},
    }


def _v1(route: str) -> Schema:
    if route in intake.BATCH_ROUTES:
        body, summary = _ref("BatchRequest"), "a batch of events"
    else:
        kind = intake.SINGLE_ROUTES[route]
        body, summary = _event(kind), f"one {kind} call"
    return {
        **_ingest(
            f"v1_{route}",
            "tracking API",
            f"Segment HTTP Tracking API: {summary}",
            body,
            description="The write key goes as HTTP Basic username, or as `writeKey` in the "
            "body. A batch's invalid events are dead-lettered (`invalid_event`) and listed in "
            "`rejected`; an invalid single event is a 400. Client clocks are corrected as "
            "Segment does: timestamp = receivedAt - (sentAt - timestamp as sent), the sent "
            "one kept as `originalTimestamp`.",
            security=[{"writeKey": []}],
        ),
        "options": _preflight(route),
    }


def _get(operation_id: str, summary: str, responses: Schema, **extra: Any) -> Schema:
    operation = {"operationId": operation_id, "summary": summary, "responses": responses}
    return {"get": {**operation, **extra}}


_ADMIN = {"tags": ["admin"], "security": [{"adminToken": []}]}
_ADMIN_OFF = _response("the admin API is off (RELAY_ADMIN_TOKEN unset)", _ref("Error"))
_ADMIN_401 = _response("missing or invalid bearer token", _ref("Error"))
_ADMIN_ERRORS: Schema = {"401": _ADMIN_401, "404": _ADMIN_OFF}
_ADMIN_400: Schema = {
    "description": "a bad query or selection",
    "content": {**_content(_ref("Error")), **_content(_STRING, "text/plain")},
}
_SELECTION = _object(
    {"ids": {"type": "array", "items": _STRING}, "all": {"type": "boolean"}, "reason": _REASON},
    description="which dead letters: `ids`, `all: true`, or `reason`",
)


def _admin_post(operation_id: str, summary: str, counted: str) -> Schema:
    done = _response(summary, _object({counted: _INTEGER}, counted))
    too_big = _response("body over the server's size limit", _STRING, "text/plain")
    responses = {"200": done, "400": _ADMIN_400, **_ADMIN_ERRORS, "413": too_big}
    if counted == "replayed":
        responses["503"] = _response("could not queue the events", _ref("Error"))
    operation = {"operationId": operation_id, "summary": summary, "responses": responses}
    body = {"required": True, "content": _content(_SELECTION)}
    return {"post": {**operation, **_ADMIN, "requestBody": body}}


WEBHOOK_BATCH = intake.WEBHOOK_LIMITS.batch_events


def _paths() -> Schema:
    array = {"type": "array", "items": _ref("Event"), "maxItems": WEBHOOK_BATCH}
    webhook_body = {"anyOf": [_ref("Event"), array]}
    paths: Schema = {
        "/webhook": _ingest(
            "webhook",
            "webhook",
            "Segment Webhooks destination: one event, or an array when batching",
            webhook_body,
            methods=("post", "put", "patch"),
            responses=_WEBHOOK_RESPONSES,
            description="`X-Signature` is the hex HMAC-SHA1 of the body with the shared "
            "secret (for an array, of its first element's exact bytes). A write key as "
            "HTTP Basic username is accepted too. PUT and PATCH do the same as POST "
            "(Segment's Actions webhook lets its user pick the method).",
            security=[{"webhookSignature": []}, {"writeKey": []}],
        )
    }
    for route in sorted([*intake.SINGLE_ROUTES, *intake.BATCH_ROUTES]):
        paths[f"/v1/{route}"] = _v1(route)
    status = _ref("Status")
    paths["/livez"] = _get("livez", "the process answers", {"200": _response("alive", status)})
    paths["/readyz"] = _get(
        "readyz",
        "Redis answers and the queue is under its high-water mark",
        {"200": _response("ready", status), "503": _response("not ready: see reason", status)},
    )
    text = _response("Prometheus text exposition format", _STRING, "text/plain")
    paths["/metrics"] = _get("metrics", "Prometheus metrics", {"200": text})
    spec = _response("OpenAPI 3.0.3", _OBJECT)
    paths["/openapi.json"] = _get("openapi", "this document", {"200": spec})
    html = _response("the page (it asks for the token)", _STRING, "text/html")
    paths["/admin"] = _get(
        "admin_page", "status page", {"200": html, "404": _ADMIN_OFF}, tags=["admin"]
    )
    report = _response("queue depths, dead letters, rates", _OBJECT)
    paths["/admin/api/status"] = _get(
        "admin_status", "status report", {"200": report, **_ADMIN_ERRORS}, **_ADMIN
    )
    listed = {"type": "array", "items": _ref("DeadLetter")}
    entries = _object({"total": _INTEGER, "entries": listed}, "total", "entries")
    limit = {"type": "integer", "minimum": 0, "maximum": 500, "default": 50}
    paths["/admin/api/dlq"] = _get(
        "admin_dlq_list",
        "a page of dead letters, newest first",
        {"200": _response("dead letters", entries), "400": _ADMIN_400, **_ADMIN_ERRORS},
        parameters=[
            {"name": "reason", "in": "query", "schema": _REASON},
            {"name": "limit", "in": "query", "schema": limit},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
        ],
        **_ADMIN,
    )
    missing = _response("no such dead letter, or the admin API is off", _ref("Error"))
    paths["/admin/api/dlq/{id}"] = _get(
        "admin_dlq_show",
        "one dead letter",
        {**_ADMIN_ERRORS, "200": _response("the entry", _ref("DeadLetter")), "404": missing},
        parameters=[{"name": "id", "in": "path", "required": True, "schema": _STRING}],
        **_ADMIN,
    )
    paths["/admin/api/dlq/replay"] = _admin_post(
        "admin_dlq_replay", "dead letters sent through delivery again", "replayed"
    )
    paths["/admin/api/dlq/purge"] = _admin_post("admin_dlq_purge", "dead letters deleted", "purged")
    verdict = _object(
        {"index": _INTEGER, "type": _STRING, "user": _STRING, "outcome": _STRING,
         "reason": {**_STRING, "nullable": True}, "commands": {"type": "array", "items": _OBJECT},
         "errors": {"type": "array"}},
        "index", "outcome", "commands",
    )  # fmt: skip
    previewed = _object({"events": {"type": "array", "items": verdict}}, "events")
    preview_body = {"anyOf": [_ref("Event"), {"type": "array", "items": _ref("Event")},
                              _ref("BatchRequest")]}  # fmt: skip
    too_big = _response("body over the server's size limit", _STRING, "text/plain")
    paths["/admin/api/preview"] = {
        "post": {
            "operationId": "admin_preview",
            "summary": "the ChurnZero commands these events would produce now (nothing is sent)",
            "parameters": [
                {
                    "name": "source",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["api", "webhook"]},
                },
            ],
            "requestBody": {"required": True, "content": _content(preview_body)},
            "responses": {
                "200": _response("a verdict per event", previewed),
                "400": _ADMIN_400,
                **_ADMIN_ERRORS,
                "413": too_big,
            },
            **_ADMIN,
        }
    }
    found = _object({"found": {"type": "array", "items": _OBJECT}}, "found")
    paths["/admin/api/trace/{id}"] = _get(
        "admin_trace",
        "where the event with this messageId (or relay id) is",
        {"200": _response("every place it was found", found), **_ADMIN_ERRORS},
        parameters=[{"name": "id", "in": "path", "required": True, "schema": _STRING}],
        **_ADMIN,
    )
    return paths


def _schemas() -> Schema:
    field_error = _object({"field": _STRING, "message": _STRING}, "field", "message")
    rejected = _object(
        {"index": _INTEGER, "errors": {"type": "array", "items": field_error}}, "index", "errors"
    )
    batch = {"type": "array", "items": _ref("Event"), "maxItems": intake.MAX_BATCH_EVENTS}
    return {
        "Event": _event(None),
        "BatchRequest": _object(
            {
                "batch": batch,
                "context": {**_OBJECT, "description": "defaults for each event's context"},
                "integrations": {**_OBJECT, "description": "defaults for each event's"},
                "writeKey": _STRING,
            },
            "batch",
            additionalProperties=True,
        ),
        "Accepted": _object(
            {
                "success": {"type": "boolean", "enum": [True]},
                "accepted": {"type": "integer", "minimum": 0},
                "rejected": {"type": "array", "items": rejected},
            },
            "success",
        ),
        "Error": _object({"error": _STRING}, "error"),
        "Status": _object(
            {
                "status": {"type": "string", "enum": ["ok", "ready", "unready"]},
                "waiting": _INTEGER,
                "reason": _STRING,
            },
            "status",
        ),
        "DeadLetter": _object(
            {"id": _STRING, "reason": _REASON}, "id", "reason", additionalProperties=True
        ),
    }


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
        "schemas": _schemas(),
    },
}
_BODY = orjson.dumps(SPEC)


async def openapi_view(_: web.Request) -> web.Response:
    """GET /openapi.json: this API's OpenAPI document."""
    return web.Response(body=_BODY, content_type=_JSON)


def add_routes(app: web.Application) -> None:
    """Mount `GET /openapi.json` on the ingest app."""
    app.router.add_get("/openapi.json", openapi_view)
