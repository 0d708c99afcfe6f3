"""What the server answers holds to its OpenAPI document, body by body.

The handlers build their answers as dict literals (no model on the hot path), so nothing
but this keeps them and the document together: each answer ingest, its probes and the
admin API give here must be a status the document lists for the route, and its body must
validate, strictly and with no key left over, against the type (`relay.ingest.bodies`) the
document names for that status. (The 408 of a slow body is checked in test_hostile.)
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient
from pydantic import TypeAdapter
from pytest_aiohttp import AiohttpClient

from relay.ingest import bodies, openapi
from relay.ops.server import create_app
from relay.settings import Settings
from tests.integration.conftest import SECRET, WRITE_KEY, sign, url_of
from tests.procs import free_port

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
ORIGIN = "https://app.example"
BASIC = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TRACK = {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "m-1"}
INVALID = {"type": "track", "userId": "u1"}  # no event name

Client = TestClient[Any, Any]
Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(aiohttp_client: AiohttpClient, r: redis.Redis) -> Start:
    """An in-process ingest app on the test database (or on `redis_url`), served."""

    async def started(redis_url: str | None = None, **settings: Any) -> Client:
        given = {"webhook_secret": SECRET, "write_keys": (WRITE_KEY,), "admin_token": TOKEN,
                 "cors_origins": (ORIGIN,), **settings}  # fmt: skip
        return await aiohttp_client(create_app(Settings(**given), redis_url or url_of(r)))

    return started


@functools.cache
def adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(getattr(bodies, name))


class Answers:
    """Sends requests and checks each answer against the document; keeps what it saw."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: set[tuple[str, str, int]] = set()

    async def __call__(
        self, method: str, path: str, body: Any = None, route: str | None = None, **kw: Any
    ) -> Any:
        """The answer's JSON body, once it holds to the document for `route` (the path's
        template, `path` by default)."""
        route = route or path.partition("?")[0]
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        async with self.client.request(method, path, data=data, **kw) as response:
            raw = await response.read()
            status, media_type = response.status, response.content_type
        documented = openapi.SPEC["paths"][route][method.lower()]["responses"]
        assert str(status) in documented, f"{method} {route} answered {status}: {raw[:200]!r}"
        self.seen.add((method, route, status))
        content = documented[str(status)].get("content")
        if content is None:
            assert raw == b""
            return None
        assert media_type in content
        reference = content[media_type]["schema"].get("$ref")
        if reference is None:  # text, or a document: no type of ours to hold it to
            return raw
        return adapter(reference.rpartition("/")[2]).validate_json(raw, strict=True)


async def test_ingest_answers_hold_to_the_document(start: Start) -> None:
    answer = Answers(await start())
    signed = orjson.dumps(TRACK)
    batch = orjson.dumps([TRACK, INVALID])
    assert await answer("POST", "/webhook", signed, headers={"X-Signature": sign(signed)}) == {
        "success": True
    }
    mixed = await answer("PUT", "/webhook", batch, headers={"X-Signature": sign(batch)})
    assert mixed["accepted"] == 1 and mixed["rejected"][0]["index"] == 1
    await answer("POST", "/webhook", b"{", headers={"X-Signature": sign(b"{")})
    await answer("PATCH", "/webhook", signed, headers={"X-Signature": "0" * 40})

    auth = {"Authorization": BASIC}
    await answer("POST", "/v1/track", TRACK, headers=auth)
    refused = await answer("POST", "/v1/t", INVALID, headers=auth)
    assert "event" in refused["error"]
    rejected = await answer("POST", "/v1/batch", {"batch": [TRACK, INVALID]}, headers=auth)
    assert rejected["rejected"][0]["errors"][0]["field"] == "event"
    await answer("POST", "/v1/identify", {"userId": "u1"})  # no write key
    await answer("OPTIONS", "/v1/track", headers={"Origin": ORIGIN})
    await answer("OPTIONS", "/v1/track", headers={"Origin": "https://elsewhere.example"})

    assert await answer("GET", "/livez") == {"status": "ok"}
    assert (await answer("GET", "/readyz"))["status"] == "ready"
    await answer("GET", "/metrics")
    await answer("GET", "/openapi.json")

    # Every status of an ingest route but 503 (below) and 408 (test_hostile).
    statuses = {status for _, route, status in answer.seen if route != "/readyz"}
    assert statuses == {200, 204, 400, 401, 403}


async def test_refusals_while_redis_is_away_hold_to_the_document(start: Start) -> None:
    answer = Answers(await start(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    unready = await answer("GET", "/readyz")
    assert unready["status"] == "unready" and unready["reason"] == "redis unreachable"
    auth = {"Authorization": BASIC}
    assert "unavailable" in (await answer("POST", "/v1/track", TRACK, headers=auth))["error"]
    await answer("POST", "/webhook", orjson.dumps(TRACK), headers=auth)
    assert {status for _, _, status in answer.seen} == {503}


async def test_admin_answers_hold_to_the_document(start: Start) -> None:
    answer = Answers(await start())
    await answer("POST", "/v1/batch", {"batch": [TRACK, INVALID]}, headers={"Authorization": BASIC})

    report = await answer("GET", "/admin/api/status", headers=ADMIN)
    assert report["dead_letters"]["invalid_event"] == 1
    page = await answer("GET", "/admin/api/dlq?limit=10", headers=ADMIN)
    [entry] = page["entries"]
    await answer("GET", f"/admin/api/dlq/{entry['id']}", route="/admin/api/dlq/{id}",
                 headers=ADMIN)  # fmt: skip
    await answer("GET", "/admin/api/dlq/nope", route="/admin/api/dlq/{id}", headers=ADMIN)
    await answer("GET", "/admin/api/dlq?reason=bogus", headers=ADMIN)
    found = await answer("GET", "/admin/api/trace/m-1", route="/admin/api/trace/{id}",
                         headers=ADMIN)  # fmt: skip
    assert found["found"][0]["state"] == "queued"
    preview = await answer("POST", "/admin/api/preview", [TRACK, INVALID], headers=ADMIN)
    assert [v["outcome"] for v in preview["events"]] == ["wait", "dead"]
    assert await answer("POST", "/admin/api/dlq/replay", {"ids": [entry["id"]]},
                        headers=ADMIN) == {"replayed": 1}  # fmt: skip
    await answer("POST", "/admin/api/dlq/purge", {"ids": []}, headers=ADMIN)
    assert await answer("POST", "/admin/api/dlq/purge", {"all": True}, headers=ADMIN) == {
        "purged": 0
    }
    await answer("GET", "/admin/api/status")  # no token
    await answer("GET", "/admin", headers=ADMIN)
    assert {s for _, _, s in answer.seen} == {200, 400, 401, 404}
