"""Every Redis client the relay opens, built in one place from the settings.

`RELAY_REDIS_URL` takes one of three shapes:

- `redis://host:port/db` (or `unix:///path.sock`): one Redis, plain TCP.
- `rediss://host:port/db`: one Redis over TLS, verified against `RELAY_REDIS_TLS_CA_FILE`
  (else the system's CAs), with `RELAY_REDIS_TLS_CERT_FILE`/`_KEY_FILE` for mutual TLS.
- `sentinel://host:port;sentinel://host:port/db` with `RELAY_REDIS_MASTER`: Redis
  Sentinel, in the shape kombu's own Sentinel transport reads. Every client asks the
  sentinels for the primary and asks again after a connection error, so ingest, the
  workers, the mover, the CLI and the admin API all follow a failover.

Retrying is decided here, not left to redis-py's defaults, which differ by how a client
is built: one made from a URL tries nothing again, one made by `Redis(host, port)` (as
redis-py makes its sentinel clients) tries 10 times more with backoff. Ingest's client
reconnects once at once after a refused or dropped connection and never after a timeout,
so that it answers 503 within about a second while Redis is down (docs/operations.md,
runbook "Redis down").
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from relay.settings import SentinelURL, Settings, parse_sentinel

# Asking a sentinel is cheap and a dead one must not stall discovery: the next is tried.
SENTINEL_TIMEOUTS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
# A process that answers HTTP must answer within Segment's timeout (5-10 s), and a slow
# 503 holds connections and hides the outage. Connecting, TLS handshake included, takes
# milliseconds on any network a Redis is used over: a second is ample.
ANSWER_CONNECT_TIMEOUT_S = 1.0


def redacted(url: str) -> str:
    """`url` with its password, if any, masked: fit for a message or a log line."""
    password = urlsplit(url.split(";")[0]).password
    if password is None:
        return url
    return url.replace(f":{password}@", ":***@")


def is_sentinel(url: str) -> bool:
    """Whether `url` names Redis Sentinels rather than one Redis."""
    return url.startswith("sentinel://")


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's (and kombu's) TLS keywords: always verify, with the configured CA."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file is not None:
        options["ssl_certfile"] = str(settings.redis_tls_cert_file)
    if settings.redis_tls_key_file is not None:
        options["ssl_keyfile"] = str(settings.redis_tls_key_file)
    return options


def _master(settings: Settings) -> str:
    if settings.redis_master is None:  # settings refuse this; a guard for direct callers
        raise ValueError("a sentinel:// URL needs RELAY_REDIS_MASTER")
    return settings.redis_master


def sync_client(
    settings: Settings,
    url: str,
    *,
    socket_timeout: float = 5.0,
    socket_connect_timeout: float = 3.0,
    retry: bool = True,
) -> redis.Redis:
    """A blocking client of the primary named by `url` (following failovers with Sentinel).

    `retry=False` makes a command fail on the first connection error instead of trying
    again, perhaps on a newly promoted primary that never saw the writes before it; it
    pins that whatever redis-py's defaults (today a client made from a URL, as this one,
    tries nothing again either way).
    """
    options = _options(socket_timeout, socket_connect_timeout)
    if not retry:
        options["retry"] = Retry(NoBackoff(), 0)
    client: redis.Redis = _primary(settings, url, options, Sentinel, redis.Redis.from_url)
    return client


def async_client(
    settings: Settings,
    url: str,
    *,
    socket_timeout: float = 5.0,
    socket_connect_timeout: float = ANSWER_CONNECT_TIMEOUT_S,
) -> aioredis.Redis:
    """An asyncio client of the primary named by `url` (following failovers with Sentinel).

    A command whose connection is refused or dropped is tried again once, at once: that
    rides a pooled connection that died with a restarted Redis, at no cost when Redis is
    down. A timeout is not tried again: it has cost its bound already. The command is sent
    again as it was, so one whose reply was lost may run twice: ingest's messages are then
    settled once (relay.delivery.claims) and its dead letters keep their ids (only a count may move
    twice).
    """
    options = _options(socket_timeout, socket_connect_timeout)
    options["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    client: aioredis.Redis = _primary(settings, url, options, AsyncSentinel, aioredis.from_url)
    return client


def _options(socket_timeout: float, socket_connect_timeout: float) -> dict[str, Any]:
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}


def _primary(
    settings: Settings,
    url: str,
    options: dict[str, Any],
    sentinel_class: type[Sentinel] | type[AsyncSentinel],
    from_url: Callable[..., Any],
) -> Any:
    # The same steps for blocking and asyncio clients; only the classes differ.
    if is_sentinel(url):
        parts = parse_sentinel(url)
        # redis-py's sentinel clients would try a dead sentinel 10 times with backoff.
        no_retry = (AsyncRetry if sentinel_class is AsyncSentinel else Retry)(NoBackoff(), 0)
        sentinel = sentinel_class(
            list(parts.sentinels),
            sentinel_kwargs={**SENTINEL_TIMEOUTS, "retry": no_retry},
            db=parts.db,
            username=parts.username,
            password=parts.password,
        )
        return sentinel.master_for(_master(settings), **options)
    if url.startswith("rediss://"):
        options = {**options, **tls_options(settings)}
    return from_url(url, **options)


def celery_broker(settings: Settings, url: str) -> dict[str, Any]:
    """Celery's broker settings for `url`: the kombu URL, Sentinel options, TLS options."""
    if url.startswith("unix://"):  # kombu spells unix sockets differently
        return {"broker_url": "redis+socket://" + url.removeprefix("unix://")}
    if is_sentinel(url):
        parts = parse_sentinel(url)
        # kombu reads the database from the first URL only: name it on every one.
        return {
            "broker_url": ";".join(
                f"sentinel://{_credentials(parts)}{host}:{port}/{parts.db}"
                for host, port in parts.sentinels
            ),
            "broker_transport_options": {
                "master_name": _master(settings),
                "sentinel_kwargs": dict(SENTINEL_TIMEOUTS),
            },
        }
    if url.startswith("rediss://"):
        # Without broker_use_ssl kombu would connect to rediss:// without verifying.
        return {"broker_url": url, "broker_use_ssl": tls_options(settings)}
    return {"broker_url": url}


def _credentials(parts: SentinelURL) -> str:
    if parts.password is None:
        return ""
    return f"{quote(parts.username or '', safe='')}:{quote(parts.password, safe='')}@"
