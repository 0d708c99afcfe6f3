"""The ChurnZero HTTP API client: JSON arrays of commands POSTed to `/i`.

ChurnZero answers 200 to everything it receives, so success here only means "arrived";
commands are validated before they get here. Gateways in front of it can still answer
429/5xx and networks fail: every failure comes back as a `retry.Outcome`, never raised.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from relay.retry import Outcome, parse_retry_after
from relay.translate import Command


class ChurnZeroClient:
    """A keep-alive connection pool to ChurnZero, for one event loop."""

    def __init__(self, url: str, app_key: str, *, timeout_s: float, pool_size: int = 16) -> None:
        self._url = url
        self._app_key = app_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 5))
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                json_serialize=lambda v: orjson.dumps(v).decode(),
                headers={"User-Agent": "churnzero-relay"},
            )
        return self._session

    async def send(self, commands: list[Command]) -> Outcome:
        """POST one JSON array of commands; the outcome, whatever happened."""
        body = orjson.dumps([{"appKey": self._app_key, **c} for c in commands])
        try:
            async with self._open().post(
                self._url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                excerpt = (await response.content.read(500)).decode("utf-8", "replace")
                return Outcome(
                    status=response.status,
                    retry_after_s=parse_retry_after(
                        response.headers.get("Retry-After"), time.time()
                    ),
                    excerpt=excerpt if response.status >= 300 else "",
                )
        except TimeoutError:
            return Outcome(status=None, error="timeout")
        except aiohttp.ClientError as exc:
            return Outcome(status=None, error="connection_error", excerpt=type(exc).__name__)

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            # Let the connector's transports finish closing (aiohttp's documented advice).
            await asyncio.sleep(0)
