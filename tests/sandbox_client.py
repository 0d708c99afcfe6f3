"""Talking to the ChurnZero sandbox app through aiohttp's test client (unit and
integration tests of the sandbox share these)."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

GIF_1X1 = b"GIF89a\x01\x00\x01\x00"


async def assert_pixel(response: aiohttp.ClientResponse) -> None:
    """The answer is ChurnZero's: 200 and the 1x1 GIF."""
    assert response.status == 200
    assert response.content_type == "image/gif"
    body = await response.read()
    assert body.startswith(GIF_1X1) and body.endswith(b";")


async def get_json(client: TestClient[Any, Any], path: str) -> Any:
    """A sandbox endpoint's JSON, answered 200."""
    response = await client.get(path)
    assert response.status == 200
    return await response.json()


async def commands(client: TestClient[Any, Any]) -> list[dict[str, Any]]:
    """The commands the sandbox recorded, in order."""
    return list(await get_json(client, "/_sandbox/commands"))


async def set_faults(client: TestClient[Any, Any], **faults: Any) -> None:
    """Set the sandbox's faults, which it must accept."""
    response = await client.post("/_sandbox/faults", json=faults)
    assert response.status == 200, await response.text()
