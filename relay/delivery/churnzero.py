"""The ChurnZero HTTP API client: JSON arrays of commands POSTed to `/i`.

ChurnZero answers 200 to everything it receives, so success here only means "arrived";
commands are validated before they get here. Gateways in front of it can still answer
429/5xx and networks fail: every failure comes back as a `retry.Outcome`, never raised.

Redirects are never followed: aiohttp would follow a 301/302 with a bodyless GET, which
ChurnZero answers 200, and the events would count as delivered without arriving. A 3xx,
or a 2xx that is not ChurnZero's image (a proxy's or captive portal's HTML page), is a
configuration error: the outcome says so and asks every worker to hold back.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from relay import eiv
from relay.commands import Command
from relay.retry import Outcome, parse_retry_after


class ChurnZeroClient:
    """A keep-alive connection pool to ChurnZero, for one event loop."""

    def __init__(
        self,
        url: str,
        app_key: str,
        *,
        timeout_s: float,
        pool_size: int = 16,
        misconfigured_pause_s: float = 60.0,
        eiv_secret: str | None = None,
    ) -> None:
        self._url = url
        self._app_key = app_key
        self._misconfigured_pause_s = misconfigured_pause_s
        self._eiv_secret = eiv_secret
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
        sent = [c.to_dict() for c in commands]
        if self._eiv_secret:
            sent = [eiv.signed(c, self._eiv_secret) for c in sent]
        body = orjson.dumps([{"appKey": self._app_key, **c} for c in sent])
        try:
            async with self._open().post(
                self._url,
                data=body,
                headers={"Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                head = await response.content.read(500)
                excerpt = head.decode("utf-8", "replace")
                problem = misconfiguration(
                    response.status, response.content_type, head, response.headers.get("Location")
                )
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                return Outcome(
                    status=response.status,
                    retry_after_s=self._misconfigured_pause_s if problem else retry_after,
                    excerpt=excerpt if response.status >= 300 or problem else "",
                    misconfigured=problem,
                )
        except TimeoutError:
            return Outcome(status=None, error="timeout")
        except aiohttp.ClientError as exc:
            return Outcome(status=None, error="connection_error", excerpt=type(exc).__name__)

    @property
    def url(self) -> str:
        """Where commands are sent."""
        return self._url

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            # Let the connector's transports finish closing (aiohttp's documented advice).
            await asyncio.sleep(0)


# ChurnZero's HTTP API "always responds with HTTP 200 and a 1x1 transparent GIF image"
# (support.churnzero.com, "Integrate ChurnZero using HTTP API"). An image type, or GIF/PNG
# bytes under another type, is taken as ChurnZero's answer.
_IMAGE_MAGIC = (b"GIF87a", b"GIF89a", b"\x89PNG")


def misconfiguration(
    status: int, content_type: str, head: bytes, location: str | None
) -> str | None:
    """Why an answer cannot be ChurnZero's own (None: it can be)."""
    if 300 <= status < 400:
        return f"redirect {status} to {location or '(no Location)'}: fix RELAY_CHURNZERO_URL"
    if 200 <= status < 300:
        if content_type.startswith("image/") or head.startswith(_IMAGE_MAGIC):
            return None
        shown = content_type or "no Content-Type"
        return f"{status} with {shown}, not ChurnZero's image: a proxy or portal answered"
    return None
