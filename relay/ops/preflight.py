"""`relay check`: whether this deployment is ready to relay, before it runs.

Each check gives findings: `ok`, `warning` (works, but something acknowledged could be
lost or a fault would go unseen) or `problem` (the relay would refuse to start, or would
count events delivered that ChurnZero never keeps). Ready means no problem.

The request to ChurnZero is `GET RELAY_CHURNZERO_URL` with no query and no body: no app
key, no action, no ids, so there is nothing for ChurnZero to record, and it answers it
as it answers everything, 200 with its 1x1 image. That answer proves the name resolves,
TLS verifies, and ChurnZero itself (not a proxy, portal or redirect) is at the URL. The
app key is not sent: ChurnZero would answer 200 to a wrong one too, and a query string
ends up in access logs.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import redis

from relay.delivery.churnzero import misconfiguration
from relay.settings import Settings
from relay.state import redis_conn

Level = Literal["ok", "warning", "problem"]
# Bytes of an answer read to tell ChurnZero's image from a page.
_HEAD_BYTES = 64


@dataclass(frozen=True)
class Finding:
    """One line of `relay check`: how it stands, which part, and what to do."""

    level: Level
    part: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """The finding as `relay check --json` shows it."""
        return asdict(self)


def ready(findings: list[Finding]) -> bool:
    """Whether no finding is a problem."""
    return all(f.level != "problem" for f in findings)


def check_settings(settings: Settings) -> list[Finding]:
    """The credentials the services refuse to start without."""
    found = [Finding("ok", "settings", "valid")]
    if not settings.authenticated and not settings.allow_unauthenticated:
        found.append(Finding("problem", "ingest", "no RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS: "
                             "relay serve refuses to start without one"))  # fmt: skip
    elif not settings.authenticated:
        found.append(Finding("warning", "ingest", "authentication is off "
                             "(RELAY_ALLOW_UNAUTHENTICATED): anyone can post events"))  # fmt: skip
    if settings.churnzero_app_key is not None:
        found.append(Finding("ok", "app key", "RELAY_CHURNZERO_APP_KEY is set"))
    elif settings.churnzero_is_loopback:
        found.append(Finding("ok", "app key", "none needed by the sandbox on loopback"))
    else:
        found.append(
            Finding(
                "problem",
                "app key",
                "RELAY_CHURNZERO_APP_KEY is unset: relay "
                "worker refuses to start (ChurnZero drops commands without it)",
            )
        )
    return found


def check_redis(settings: Settings, url: str | None) -> list[Finding]:
    """Reachable, its version, AOF persistence on, maxmemory-policy noeviction."""
    if url is None:
        return [Finding("warning", "redis", "RELAY_REDIS_URL is unset and no relay runs here: "
                        "relay serve and worker start an embedded Redis under "
                        f"{settings.state_dir}/ (one machine only)")]  # fmt: skip
    shown = redis_conn.redacted(url)
    client = redis_conn.sync_client(settings, url, socket_timeout=5, retry=False)
    try:
        info = client.info()
    except redis.RedisError as exc:
        return [Finding("problem", "redis", f"cannot reach Redis at {shown} ({exc}): is it "
                        "running? RELAY_REDIS_URL names it, e.g. redis://host:6379/0")]  # fmt: skip
    finally:
        client.close()
    found = [Finding("ok", "redis", f"Redis {info.get('redis_version', '?')} at {shown}")]
    if not int(info.get("aof_enabled", 0)):
        found.append(Finding("warning", "redis", "AOF persistence is off: a Redis restart loses "
                             "events ingest acknowledged (appendonly yes)"))  # fmt: skip
    policy = info.get("maxmemory_policy", "?")
    if policy != "noeviction":
        found.append(Finding("warning", "redis", f"maxmemory-policy is {policy}: a full Redis "
                             "evicts queued events (set noeviction)"))  # fmt: skip
    if not int(info.get("maxmemory", 0)):
        found.append(Finding("warning", "redis", "maxmemory is unset: ingest's memory gate "
                             "(RELAY_MAX_MEMORY_FRACTION) is off"))  # fmt: skip
    return found


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer to report, not to follow: the workers do not follow it."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


def _opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    # No proxy from the environment: the workers' client goes straight to ChurnZero, and
    # the check must take the road they take.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


def check_churnzero(settings: Settings) -> list[Finding]:
    """The URL resolves, TLS verifies, and ChurnZero answers the no-op GET with its image."""
    url = settings.churnzero_url
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"ChurnZero URL {url}"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return [
            Finding(
                "problem",
                "churnzero",
                f"{host} does not resolve ({exc}): no DNS, or a typo in "
                "RELAY_CHURNZERO_URL? (ChurnZero's is https://analytics.churnzero.net/i)",
            )
        ]
    found = []
    if parts.scheme == "http" and not settings.churnzero_is_loopback:
        found.append(Finding("warning", "churnzero", f"{where} is plain http: the app key "
                             "travels in clear"))  # fmt: skip
    opener = _opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=ssl.create_default_context())
    )
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "relay-check"})
    try:
        with opener.open(request, timeout=settings.churnzero_timeout_s) as answer:
            status, headers, head = answer.status, answer.headers, answer.read(_HEAD_BYTES)
    except urllib.error.HTTPError as exc:
        status, headers, head = exc.code, exc.headers, b""
    except (urllib.error.URLError, OSError) as exc:
        problem = _unreachable(where, exc, settings.churnzero_timeout_s)
        return [*found, Finding("problem", "churnzero", problem)]
    wrong = misconfiguration(status, headers.get("Content-Type", ""), head,
                             headers.get("Location"))  # fmt: skip
    if wrong is None and not 200 <= status < 300:
        wrong = f"answered {status}: not ready to take commands now"
    if wrong is not None:
        return [*found, Finding("problem", "churnzero", f"{where}: {wrong}")]
    return [*found, Finding("ok", "churnzero", f"{url} answers with its image")]


def _unreachable(where: str, exc: Exception, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"{where}: TLS certificate not valid ({reason.verify_message}): fix the URL"
    if isinstance(reason, ssl.SSLError):
        return f"{where}: TLS failed ({reason}): is it an https port?"
    if isinstance(reason, ConnectionRefusedError):
        return f"{where}: connection refused: nothing listens on that port"
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"{where}: no answer within {timeout_s:g} s: a firewall, or the wrong host?"
    return f"{where}: cannot connect ({reason})"


def check_eiv(settings: Settings) -> list[Finding]:
    """EIV hashes are sent when the tenant needs them, as far as the relay can know: the
    sandbox says whether it verifies; ChurnZero answers the same either way."""
    secret = settings.churnzero_eiv_secret is not None
    needs = _sandbox_needs_eiv(settings.churnzero_url)
    if needs and not secret:
        return [Finding("problem", "eiv", "the tenant verifies identities (Enhanced Identity "
                        "Verification) and RELAY_CHURNZERO_EIV_SECRET is unset: every command "
                        "would be dropped")]  # fmt: skip
    if secret:
        return [Finding("ok", "eiv", "RELAY_CHURNZERO_EIV_SECRET is set: commands carry hashes")]
    if needs is None:
        return [Finding("ok", "eiv", "off; if the tenant has Enhanced Identity Verification on "
                        "(Admin > General Settings), set RELAY_CHURNZERO_EIV_SECRET")]  # fmt: skip
    return [Finding("ok", "eiv", "off; the sandbox does not verify identities")]


def _sandbox_needs_eiv(url: str) -> bool | None:
    """What the sandbox at `url` says of EIV; None when it is not a sandbox (ChurnZero)."""
    parts = urlsplit(url)
    if (parts.hostname or "").endswith("churnzero.net"):
        return None
    tenant = parts._replace(path="/_sandbox/tenant", query="", fragment="").geturl()
    try:
        with _opener().open(tenant, timeout=5) as answer:
            return bool(orjson.loads(answer.read()).get("eiv"))
    except (OSError, ValueError, AttributeError):
        return None


def run(settings: Settings, redis_url: str | None) -> list[Finding]:
    """Every check, in the order an operator fixes them."""
    return [
        *check_settings(settings),
        *check_redis(settings, redis_url),
        *check_churnzero(settings),
        *check_eiv(settings),
    ]
