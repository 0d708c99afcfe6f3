"""kombu's Redis transport for the workers, able to start and drain a full Redis.

At `maxmemory` with `noeviction` Redis refuses every command that may grow memory. Stock
kombu then fails where a draining worker must write (reproduced in
tests/integration/test_memory.py):

* `QoS.append`, after `BRPOP` took a message off the queue, records it as unacked
  (ZADD + HSET carrying the whole message). Refused, the worker stops with
  "Unrecoverable error" and the message it popped is in neither list: lost.
* `QoS.restore_visible` takes a mutex (SET NX PX) at start and every few polls. Refused,
  the worker stops before it consumes anything.
* Acks and rejects delete inside MULTI, and Redis refuses every command queued in a
  MULTI at maxmemory, even a deletion.
* When Celery gives up on a task (its retry could not be published, or its retries ran
  out) it rejects the message without requeue, and kombu deletes it: events lost. Here
  such a message stays unacked and is redelivered after the visibility timeout.

Everything a worker writes here moves work that is already in Redis (queue to unacked)
or is a few bytes of bookkeeping, while each acknowledged message frees its whole body:
draining only ever shrinks Redis. So these writes run as scripts flagged `allow-oom`
(Redis 7+), which Redis lets write at maxmemory, as do the worker's other writes (its
settlements, relay.state.oom; the delayed-set mover's publishes, relay.state.broker).
New events come in only through ingest, which stays on stock kombu and its gate refuses
them well before maxmemory (`RELAY_MAX_MEMORY_FRACTION`), so nothing else overshoots.

On servers before 7 (no script flags) the stock behaviour applies.

Two more changes keep a Redis failover (or restart) from losing a message or stopping a
worker:

* kombu takes a message off the queue with BRPOP and only then records it as unacked.
  If Redis goes away between the two (a primary SIGKILLed while a worker polls), the
  message is in no list: here the worker keeps trying to record it until a primary
  answers again (a Sentinel failover takes a second or two).
* Celery acknowledges a task's message after its consumer may have closed the channel to
  reconnect; kombu then fails with an AttributeError that stops the whole worker. Here a
  closed channel says so with a connection error, which Celery logs, and the message stays
  unacked and comes back.

`install()` points kombu's `redis://`, `rediss://` and `sentinel://` schemes at these
classes in the worker's process: kombu picks a transport by URL scheme, also when it
fails over to the next sentinel URL, so a Celery setting could not reach every connection.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import structlog
from kombu.transport import TRANSPORT_ALIASES, get_transport_cls, virtual
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.state.oom import ALLOW_OOM, script_flags

log = structlog.get_logger("relay.transport")
# Longer than a failover (down-after-milliseconds plus the election); the worker's
# consumer waits meanwhile, which it would do anyway with no primary to poll.
RECORD_PATIENCE_S = 60.0
_RETRY_EVERY_S = 0.25


def _script(*calls: str) -> str:
    """A script of these `redis.call`s that Redis 7+ runs at maxmemory too."""
    return ALLOW_OOM + "".join(f"redis.call({call})\n" for call in calls) + "return 0\n"


# KEYS: unacked index, unacked hash. ARGV: score, delivery tag, payload (kombu's format).
_APPEND = _script("'ZADD', KEYS[1], ARGV[1], ARGV[2]", "'HSET', KEYS[2], ARGV[2], ARGV[3]")
# KEYS: unacked index, unacked hash. ARGV: delivery tag. (kombu runs these in MULTI,
# and Redis refuses every command queued in a MULTI at maxmemory, even deletions.)
_REMOVE = _script("'ZREM', KEYS[1], ARGV[1]", "'HDEL', KEYS[2], ARGV[1]")
# KEYS: the exchange's binding table and its permanent twin. ARGV: the member.
_BIND = _script("'SADD', KEYS[1], ARGV[1]", "'SADD', KEYS[2], ARGV[1]")


class QoS(kombu_redis.QoS):
    """kombu's ack emulation; unacked bookkeeping and restores survive a full Redis."""

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as unacked, even at maxmemory, waiting out a
        failover rather than losing it."""
        deadline = time.monotonic() + RECORD_PATIENCE_S
        waited = False
        while True:
            try:
                self._append(message, delivery_tag)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                if not waited:
                    log.warning("unacked_record_waits", error=type(exc).__name__)
                waited = True
                time.sleep(_RETRY_EVERY_S)

    def _append(self, message: Any, delivery_tag: str) -> None:
        channel: _AllowOom = self.channel
        if not channel.allow_oom:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        # kombu's record ([message, exchange, routing key]), as kombu reads it back; its
        # own encoder escapes every byte of the message's base64 body in Python's JSON.
        payload = orjson.dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with channel.conn_or_acquire() as client:
            client.eval(_APPEND, 2, self.unacked_index_key, self.unacked_key,
                        time.time(), delivery_tag, payload)  # fmt: skip
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Forget an acknowledged message, even at maxmemory."""
        self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Requeue a message; one Celery gives up on stays unacked, for redelivery."""
        if requeue:
            try:
                self.restore_by_tag(delivery_tag, leftmost=True)
            except (OutOfMemoryError, ExecAbortError):
                # One transaction: the message is still in unacked, and restore_visible
                # brings it back after the visibility timeout.
                log.warning("requeue_deferred", error="redis at maxmemory")
        else:
            # The relay's task settles every event itself (delivered, retried, dead-
            # lettered); Celery rejects without requeue only when it gave up for want of
            # Redis (a retry it could not publish, retries exhausted). Deleting the
            # message would lose acknowledged events: it comes back after the
            # visibility timeout instead.
            log.warning("reject_kept_for_redelivery", delivery_tag=delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """When the channel closes (shutdown, a lost connection), requeue what this worker
        held; what cannot be requeued now stays unacked and comes back after the
        visibility timeout."""
        try:
            super().restore_unacked(client)
        except (OutOfMemoryError, ExecAbortError):
            log.warning("restore_unacked_deferred", error="redis at maxmemory")
        except (AttributeError, RedisError, OSError) as exc:
            # kombu 5.7 closing a channel whose connection is gone fails to make a client
            # (AttributeError in `_connparams`) and the worker would stop for good.
            log.warning("restore_unacked_deferred", error=type(exc).__name__)

    def _remove(self, delivery_tag: str) -> None:
        channel: _AllowOom = self.channel
        if not channel.allow_oom:
            self._remove_from_indices(delivery_tag).execute()
            return
        with channel.conn_or_acquire() as client:
            client.eval(_REMOVE, 2, self.unacked_index_key, self.unacked_key, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """Requeue messages past the visibility timeout; at maxmemory, try again later."""
        try:
            super().restore_visible(start=start, num=num, interval=interval)
        except (OutOfMemoryError, ExecAbortError):
            # The mutex SET or a requeue was refused: nothing changed (the requeue is one
            # transaction). Draining frees memory; a later poll restores them.
            log.warning("restore_visible_deferred", error="redis at maxmemory")


class _ClosedAware:
    """A closed channel says so with a connection error (see the module docstring)."""

    connection: Any

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the channel's broker connection is closed")
        return super()._get_pool(asynchronous)


class _AllowOom(kombu_redis.Channel):
    """kombu's Redis channel with the QoS above and bindings that survive a full Redis."""

    QoS = QoS

    _allow_oom: bool | None = None

    @property
    def allow_oom(self) -> bool:
        """Whether writes go through allow-oom scripts (Redis 7+, no key prefix)."""
        if self._allow_oom is None:
            # A client of the shared pool, not `self.client`, whose connection may be
            # waiting on a BRPOP.
            with self.conn_or_acquire() as client:
                self._allow_oom = not self.global_keyprefix and script_flags(client)
        return self._allow_oom

    def _size(self, queue: str) -> int:
        # Read without MULTI: Redis refuses a MULTI at maxmemory, even of reads.
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))
            return sum(n for n in pipe.execute() if isinstance(n, int))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        if (
            not self.allow_oom
            or queue in self._queue_expiries()
            or self.typeof(exchange).type == "fanout"
        ):
            super()._queue_bind(exchange, routing_key, pattern, queue)
            return
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        table = self.keyprefix_queue % (exchange,)
        # kombu 5.7 keeps a permanent twin of the binding table; 5.6 has only the table.
        permanent = getattr(self, "keyprefix_binding_permanent", None)
        twin = permanent % (exchange,) if permanent else table
        with self.conn_or_acquire() as client:
            client.eval(_BIND, 2, table, twin, member)

    def _queue_expiries(self) -> dict[str, Any]:
        # Queues with an expiry (kombu 5.7; none in 5.6) keep kombu's own code paths.
        return getattr(self, "_expires", None) or {}


class Channel(_ClosedAware, _AllowOom):
    """`redis://` and `rediss://` channels of a worker."""


class SentinelChannel(_ClosedAware, _AllowOom, kombu_redis.SentinelChannel):
    """`sentinel://` channels of a worker."""


class Transport(kombu_redis.Transport):
    """The workers' transport for `redis://` and `rediss://`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """The workers' transport for `sentinel://`."""

    Channel = SentinelChannel


def install() -> None:
    """Make kombu use these transports for Redis URLs in this process (a worker's)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    # kombu caches what it resolved: too late if something already opened a Redis broker.
    chosen: object = get_transport_cls("redis")
    if chosen is not Transport:
        raise RuntimeError("relay.state.transport.install() ran after kombu chose a transport")
