"""The sandbox's faults that play out in time: expiring faults, the rate limit, latency.

Their verdicts lean on the clock (a fault that lasts 0.3 s, a client pacing at the rate),
so they run with the integration tests, out of the unit layer's fast loop; what the
sandbox answers and records at an instant is tested in tests/unit/test_sandbox.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from relay.dev import sandbox
from tests.sandbox_client import assert_pixel, commands, get_json, set_faults

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    return await aiohttp_client(sandbox.create_app())


async def test_status_fault_expires_and_refused_commands_are_not_recorded(
    client: TestClient[Any, Any],
) -> None:
    await set_faults(client, status=503, for_s=0.3)
    refused = await client.post("/i", json={"n": 1})
    assert refused.status == 503
    assert "Retry-After" not in refused.headers
    await asyncio.sleep(0.35)
    await assert_pixel(await client.post("/i", json={"n": 2}))
    assert await commands(client) == [{"n": 2}]
    assert await get_json(client, "/_sandbox/faults") == {}
    log = await get_json(client, "/_sandbox/requests")
    assert [r["status"] for r in log] == [503, 200]
    stats = await get_json(client, "/_sandbox/stats")
    assert stats["by_status"] == {"200": 1, "503": 1}
    assert stats["commands"] == 1


async def test_rate_limit_lets_rps_through_and_429s_the_rest(
    client: TestClient[Any, Any],
) -> None:
    await set_faults(client, rate_limit_rps=20)
    started = time.monotonic()
    responses = await asyncio.gather(*(client.post("/i", json={"n": n}) for n in range(60)))
    refilled = 20 * (time.monotonic() - started)  # a slow machine earns more tokens
    ok = [r for r in responses if r.status == 200]
    throttled = [r for r in responses if r.status == 429]
    assert 20 <= len(ok) <= 20 + refilled + 1
    assert throttled
    assert len(ok) + len(throttled) == 60
    assert all(r.headers["Retry-After"] == "1" for r in throttled)
    assert len(await commands(client)) == len(ok)


async def test_rate_limit_never_refuses_a_client_pacing_at_rps(
    client: TestClient[Any, Any],
) -> None:
    await set_faults(client, rate_limit_rps=40)
    statuses = []
    for n in range(30):
        statuses.append((await client.post("/i", json={"n": n})).status)
        await asyncio.sleep(1 / 40)
    assert statuses == [200] * 30


async def test_latency_delays_every_answer(client: TestClient[Any, Any]) -> None:
    await set_faults(client, latency_ms=150)
    started = time.monotonic()
    await assert_pixel(await client.get("/i", params={"a": "1"}))
    assert time.monotonic() - started >= 0.15


async def test_drop_connection_hangs_up_without_an_answer(
    client: TestClient[Any, Any],
) -> None:
    await set_faults(client, drop_connection=True, for_s=0.3)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/i", json={"n": 1})
    await asyncio.sleep(0.35)
    await assert_pixel(await client.post("/i", json={"n": 2}))
    assert await commands(client) == [{"n": 2}]
    log = await get_json(client, "/_sandbox/requests")
    assert [r["status"] for r in log] == [0, 200]


async def test_faults_combine_and_replace_each_other(client: TestClient[Any, Any]) -> None:
    await set_faults(client, status=502, latency_ms=50)
    started = time.monotonic()
    assert (await client.get("/i")).status == 502
    assert time.monotonic() - started >= 0.05
    await set_faults(client, latency_ms=1)
    await assert_pixel(await client.get("/i"))
