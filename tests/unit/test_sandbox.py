"""The ChurnZero sandbox answers like ChurnZero, records what it got, and injects faults."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.dev import sandbox
from tests.sandbox_client import assert_pixel, commands, get_json, set_faults


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    return await aiohttp_client(sandbox.create_app())


async def test_get_query_is_one_command_of_strings(client: TestClient[Any, Any]) -> None:
    query = {"appKey": "k", "action": "trackEvent", "eventName": "Login", "quantity": "2"}
    await assert_pixel(await client.get("/i", params=query))
    assert await commands(client) == [query]


async def test_form_post_is_one_command_of_strings(client: TestClient[Any, Any]) -> None:
    form = {"appKey": "k", "action": "setAttribute", "name": "Email", "value": "a+b@x.io"}
    await assert_pixel(await client.post("/i", data=form))
    assert await commands(client) == [form]


async def test_json_object_keeps_its_types(client: TestClient[Any, Any]) -> None:
    command = {"appKey": "k", "action": "trackEvent", "quantity": 3, "allowDupes": True}
    await assert_pixel(await client.post("/i", json=command))
    assert await commands(client) == [command]


async def test_json_array_is_several_commands_in_order(client: TestClient[Any, Any]) -> None:
    batch = [{"action": "trackEvent", "n": n} for n in range(5)]
    await assert_pixel(await client.post("/i", json=batch[:3]))
    await assert_pixel(await client.post("/i", json=batch[3:]))
    assert await commands(client) == batch
    log = await get_json(client, "/_sandbox/requests")
    assert [(r["method"], r["status"], r["commands"]) for r in log] == [
        ("POST", 200, 3),
        ("POST", 200, 2),
    ]
    assert all(isinstance(r["t"], float) and r["t"] <= time.time() for r in log)


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_json_without_json_content_type(
    client: TestClient[Any, Any], content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    await assert_pixel(await client.post("/i", data=b'[{"a": 1}]', headers=headers))
    assert await commands(client) == [{"a": 1}]


async def test_garbage_still_gets_a_pixel_and_is_counted(client: TestClient[Any, Any]) -> None:
    await assert_pixel(await client.post("/i", data=b"\x00not json{", headers={}))
    await assert_pixel(await client.post("/i", json=[{"ok": 1}, 7, "x"]))
    assert await commands(client) == [{"ok": 1}]
    stats = await get_json(client, "/_sandbox/stats")
    assert stats == {
        "requests": 2,
        "by_status": {"200": 2},
        "commands": 1,
        "unparseable": 3,
        "unverified": 0,
    }


async def test_status_fault_without_for_s_lasts_until_cleared(
    client: TestClient[Any, Any],
) -> None:
    await set_faults(client, status=429, retry_after=2)
    for _ in range(2):
        response = await client.get("/i", params={"a": "1"})
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
    assert await get_json(client, "/_sandbox/faults") == {"status": 429, "retry_after": 2}
    assert (await client.delete("/_sandbox/faults")).status == 200
    await assert_pixel(await client.get("/i", params={"a": "1"}))


async def test_delete_commands_clears_commands_requests_and_stats(
    client: TestClient[Any, Any],
) -> None:
    await client.post("/i", json=[{"a": 1}, {"b": 2}])
    assert (await client.delete("/_sandbox/commands")).status == 200
    assert await commands(client) == []
    assert await get_json(client, "/_sandbox/requests") == []
    stats = await get_json(client, "/_sandbox/stats")
    assert stats == {
        "requests": 0,
        "by_status": {},
        "commands": 0,
        "unparseable": 0,
        "unverified": 0,
    }


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "json"),
        (b"[503]", "body"),
        (b'{"status": 503, "for_sec": 3}', "for_sec"),
        (b'{"status": 200}', "status"),
        (b'{"status": true}', "status"),
        (b'{"status": "503"}', "status"),
        (b'{"latency_ms": -1}', "latency_ms"),
        (b'{"retry_after": 2}', "retry_after"),
        (b'{"for_s": 3}', "for_s"),
    ],
)
async def test_bad_faults_are_refused_with_the_problem_named(
    client: TestClient[Any, Any], body: bytes, named: str
) -> None:
    response = await client.post("/_sandbox/faults", data=body)
    assert response.status == 400
    assert named in (await response.json())["error"].lower()
    await assert_pixel(await client.get("/i"))


async def test_without_recording_only_stats_are_kept(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(sandbox.create_app(record=False))
    await assert_pixel(await client.post("/i", json=[{"a": 1}, {"b": 2}]))
    assert await commands(client) == []
    assert await get_json(client, "/_sandbox/requests") == []
    stats = await get_json(client, "/_sandbox/stats")
    assert stats == {
        "requests": 1,
        "by_status": {"200": 1},
        "commands": 2,
        "unparseable": 0,
        "unverified": 0,
    }


async def test_start_serves_on_a_real_port() -> None:
    runner = await sandbox.start("127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/healthz") as response,
        ):
            assert response.status == 200
            assert await response.text() == "ok"
    finally:
        await runner.cleanup()
