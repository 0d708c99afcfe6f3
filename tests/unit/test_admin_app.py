"""The admin sub-application: a refused request gets its JSON answer, the token guards
/admin/api/* only, and nothing of the admin runs around `/webhook`. In process, no Redis:
every request here is answered before the admin would read Redis."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from pytest_aiohttp import AiohttpClient

from relay.errors import RequestError
from relay.ingest import receive
from relay.ingest.webapp import SETTINGS, refusal
from relay.ops import admin, server
from relay.settings import Settings

TOKEN = {"Authorization": "Bearer t0k"}
Client = TestClient[Any, Any]


def test_a_request_error_is_answered_with_its_status_and_json_body() -> None:
    response = refusal(RequestError(400, "batch is empty", index=3))
    assert response.status == 400
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    assert orjson.loads(response.body) == {"error": "batch is empty", "index": 3}


async def admin_client(aiohttp_client: AiohttpClient, **settings: Any) -> Client:
    """The admin sub-application mounted as ingest mounts it, under a root holding the
    settings."""
    root = web.Application()
    root[SETTINGS] = Settings(**settings)
    root.add_subapp("/admin", admin.create_app())
    return await aiohttp_client(root)


async def test_admin_handlers_refuse_with_a_json_400(aiohttp_client: AiohttpClient) -> None:
    client = await admin_client(aiohttp_client, admin_token="t0k")
    answer = await client.get("/admin/api/dlq?reason=bogus", headers=TOKEN)
    assert answer.status == 400
    assert answer.content_type == "application/json"
    assert await answer.json() == {"error": "unknown reason 'bogus'"}
    answer = await client.post("/admin/api/preview?source=x", data=b"{}", headers=TOKEN)
    assert (answer.status, await answer.json()) == (400, {"error": "source must be api or webhook"})


async def test_the_token_guards_the_api_and_not_the_page(aiohttp_client: AiohttpClient) -> None:
    client = await admin_client(aiohttp_client, admin_token="t0k")
    for headers in ({}, {"Authorization": "Bearer nope"}):
        answer = await client.get("/admin/api/status", headers=headers)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert await answer.json() == {"error": "missing or invalid bearer token"}
    for path in ("/admin", "/admin/"):
        page = await client.get(path)
        assert page.status == 200
        assert page.content_type == "text/html"
        assert page.headers["Cache-Control"] == "no-store"


async def test_without_a_token_the_admin_is_off(aiohttp_client: AiohttpClient) -> None:
    client = await admin_client(aiohttp_client)
    for path in ("/admin", "/admin/", "/admin/api/status"):
        answer = await client.get(path, headers=TOKEN)
        assert answer.status == 404
        assert await answer.json() == {"error": "admin API is off (set RELAY_ADMIN_TOKEN)"}


async def test_webhook_requests_pass_through_no_admin_middleware() -> None:
    # Built, never started: no Redis is reached.
    app = server.create_app(Settings(admin_token="t0k"), "redis://127.0.0.1:1/0")
    # An application with middlewares anywhere in the tree makes aiohttp wrap every
    # handler, /webhook's too: the admin guards its routes itself.
    webhook = await app.router.resolve(make_mocked_request("POST", "/webhook", app=app))
    status = await app.router.resolve(make_mocked_request("GET", "/admin/api/status", app=app))
    assert all(not sub.middlewares for sub in [app, *webhook.apps, *status.apps])
    assert status.handler.__wrapped__ is admin.status_view  # type: ignore[attr-defined]
    assert webhook.handler is receive.webhook
