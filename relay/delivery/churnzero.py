"""The ChurnZero HTTP API client: JSON arrays of commands POSTed to `/i`.

ChurnZero answers 200 to everything it receives, so success here only means "arrived";
commands are validated before they get here. Gateways in front of it can still answer
429/5xx and networks fail: every failure comes back as a `retry.Outcome`, never raised.

Redirects are never followed: aiohttp would follow a 301/302 with a bodyless GET, which
ChurnZero answers 200, and the events would count as delivered without arriving. A 3xx,
or a 2xx that is not ChurnZero's image (a proxy's or captive portal's HTML page), is a
configuration error: the outcome says so and asks every worker to hold back.

A request that never reached an HTTP answer is named by `unreachable_kind`: `dns` (the
host does not resolve), `tls` (its certificate or handshake failed), `refused` (nothing
listens on the port) or `connect_timeout`. The outcome carries the kind and the error, and
the client logs it at WARNING (once a minute per kind) with the exception and a fix hint.
A DNS or TLS failure of a host that has not answered once since the client started is
a probable configuration error (a typo in RELAY_CHURNZERO_URL), not an outage.
"""

from __future__ import annotations

import asyncio
import errno
import time
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog

from relay import eiv
from relay.commands import Command
from relay.logs import Every
from relay.reasons import Deferral
from relay.retry import Outcome, parse_retry_after

log = structlog.get_logger("relay.delivery")

WARN_EVERY_S = 60.0  # one WARNING line per kind of unreachable host per client and minute


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
        # The connect timeout inside the total, so a host that never accepts is named
        # `connect_timeout` rather than taken for a slow answer.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s / 2, 5))
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._warnings = Every(WARN_EVERY_S)
        # Whether the host gave an HTTP answer (any status) since this client started.
        self.answered = False

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
                self.answered = True
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
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._failed(exc)

    def _failed(self, exc: BaseException) -> Outcome:
        """The outcome of a request that got no answer; a WARNING when the host cannot
        be reached at all."""
        error = (
            Deferral.TIMEOUT if isinstance(exc, TimeoutError) else Deferral.CONNECTION_ERROR
        ).value
        kind = unreachable_kind(exc)
        if kind is None:
            excerpt = "" if error == Deferral.TIMEOUT else type(exc).__name__
            return Outcome(status=None, error=error, excerpt=excerpt)
        text = f"{type(exc).__name__}: {exc}"[:300]
        if self._warnings.due(kind):
            log.warning(
                "churnzero_unreachable", kind=kind, host=self.host, error=text,
                diagnosis=diagnosis(kind, self.answered), hint=hint(kind, self.host),
                suppressed=self._warnings.suppressed(kind), exc_info=exc,
            )  # fmt: skip
        return Outcome(status=None, error=error, excerpt=text, unreachable=kind)

    @property
    def host(self) -> str:
        """The configured host and port, as the errors name it."""
        parts = urlsplit(self._url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"

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


# Unreachable hosts, by kind: what the operator should check.
_HINTS = {
    "dns": "{host} does not resolve: check RELAY_CHURNZERO_URL for a typo (ChurnZero's "
    "is https://analytics.churnzero.net/i, or your instance's host) and the worker's DNS",
    "tls": "TLS with {host} failed: check that RELAY_CHURNZERO_URL names ChurnZero's host "
    "(its certificate must match) over https, and that the worker trusts the CA (a proxy "
    "that inspects TLS needs its CA in SSL_CERT_FILE)",
    "refused": "{host} refused the connection: check the port and scheme of "
    "RELAY_CHURNZERO_URL, and any firewall or proxy on the way",
    "connect_timeout": "{host} did not accept a connection in time: check "
    "RELAY_CHURNZERO_URL, and that the worker may reach it (egress firewall, proxy)",
}


def unreachable_kind(exc: BaseException) -> str | None:
    """`dns`, `tls`, `refused` or `connect_timeout` when the host could not be reached
    at all; None for a failure after connecting (a reset, a slow answer)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, ConnectionRefusedError) or cause.errno == errno.ECONNREFUSED:
            return "refused"
    return None


def hint(kind: str, host: str) -> str:
    """What to check when the host is unreachable in this way."""
    return _HINTS.get(kind, "check RELAY_CHURNZERO_URL").format(host=host)


def diagnosis(kind: str, answered: bool) -> str:
    """What the failure most likely is: a DNS or TLS failure of a host that never
    answered is a configuration error; the rest may be an outage on the way."""
    if kind in ("dns", "tls") and not answered:
        return "probable configuration error"
    return "unreachable"
