"""kombu's Redis transports with two changes, so a Redis failover loses no message and
stops no worker.

kombu takes a message off the queue with BRPOP and only then records it as unacked (ZADD
and HSET). If Redis goes away between the two, for instance a primary SIGKILLed while a
worker polls, stock kombu loses the message: it is in no list and no hash, and its
replica has replayed the pop. Here the worker keeps trying to record it until a primary
answers again (a Sentinel failover takes a second or two), so the message becomes unacked
on the new primary and comes back after the visibility timeout if nobody finishes it.
And a channel closed under a running task fails its ack or reject with a connection error
(logged, the message left unacked) rather than an AttributeError that ends the worker.

`install()` points kombu's `redis://`, `rediss://` and `sentinel://` schemes at these
classes in this process (kombu picks a transport by URL scheme, also when it fails over
to the next sentinel URL, so a Celery setting could not reach every connection).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from kombu.transport import TRANSPORT_ALIASES, get_transport_cls
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger("relay.worker")
# Longer than a failover (down-after-milliseconds plus the election); the worker's
# consumer waits meanwhile, which it would do anyway with no primary to poll.
RECORD_PATIENCE_S = 60.0
_RETRY_EVERY_S = 0.25


class QoS(kombu_redis.QoS):
    """Records a popped message as unacked, waiting out a failover rather than losing it."""

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record `message` as delivered and unacknowledged (retrying while Redis is away)."""
        deadline = time.monotonic() + RECORD_PATIENCE_S
        waited = False
        while True:
            try:
                super().append(message, delivery_tag)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                if not waited:
                    log.warning("unacked_record_waits", error=type(exc).__name__)
                waited = True
                time.sleep(_RETRY_EVERY_S)


class _ClosedAware:
    """A closed channel says so with a connection error, which kombu and Celery handle
    (the message stays unacked in Redis and comes back), instead of kombu's
    AttributeError, which stops the whole worker: Celery acknowledges or rejects a task's
    message after the consumer may already have closed its channel to reconnect."""

    connection: Any

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the channel's broker connection is closed")
        return super()._get_pool(asynchronous)  # type: ignore[misc]  # kombu's Channel


class Channel(_ClosedAware, kombu_redis.Channel):
    """kombu's Redis channel with the QoS above."""

    QoS = QoS


class SentinelChannel(_ClosedAware, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the QoS above."""

    QoS = QoS


class Transport(kombu_redis.Transport):
    """`redis://` and `rediss://`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """`sentinel://`."""

    Channel = SentinelChannel


def install() -> None:
    """Make kombu use these transports for Redis URLs in this process."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    # kombu caches what it resolved: too late if something already opened a Redis broker.
    chosen: object = get_transport_cls("redis")
    if chosen is not Transport:
        raise RuntimeError("relay.redis_transport.install() ran after kombu chose a transport")
