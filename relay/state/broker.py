"""The relay's queue: the one way events enter it, and the count of events ready in it.

Events wait in Celery's queue `relay` (replayed dead letters in their own lane,
`relay.replay`) as `relay.deliver_batch` messages, written as Celery writes them
(relay.wire). Celery counts messages; the relay counts events in `keys.DEPTH_READY`,
which `relay status`, `/metrics` and ingest's high-water mark read and a worker's first
claim of a message moves to in flight (relay.delivery.claims). So a publish counts what it queues in
the same script call: the count moves with the messages or not at all.

- Ingest's group commits: `AsyncQueue.publish`, which counts this second's ingest rate
  too.
- The delayed-set mover: `Queue.move`, which publishes a due batch only if the same call
  takes it out of the delayed set, so two movers never both publish it.
- Dead-letter replays: relay.state.deadletter's script, which queues the messages
  `Queue.messages` encodes and removes their entries in one call, so a replay whose reply
  was lost is never queued twice.
- `relay identities forget`: `Queue.publish`.

The Celery app's configuration lives here too, shared by ingest and workers: in relay/,
so that ingest never imports workers/.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu import serialization
from kombu.exceptions import OperationalError

from relay import keys, wire
from relay.envelope import Json
from relay.errors import QueueUnavailable
from relay.settings import VISIBILITY_MARGIN_S, Settings
from relay.state import lua, oom, redis_conn, status, transport


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# Celery's JSON, written by orjson: the same bytes on the wire (plain JSON, any Celery
# consumer reads it), for less CPU per event batch than the standard library's json.
serialization.register(
    "json",
    _dumps,  # type: ignore[arg-type]  # the stubs say str; kombu sends bytes as they are
    orjson.loads,
    content_type="application/json",
    content_encoding="utf-8",
)


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    """Celery settings: late acks and prefetch 1 (a dead worker's messages come back), JSON,
    no result backend (nothing reads task results)."""
    target = redis_conn.celery_broker(settings, redis_url)
    return {
        **target,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Above the task time limit: an unacked message comes back only if its
            # worker is gone, never while it is still working on it.
            "visibility_timeout": settings.visibility_timeout_s,
            # The workers' lease (relay.state.lease); each worker sweeps for lapsed ones
            # every quarter lease (the sweep throttles itself; kombu calls it this often).
            "worker_lease": settings.worker_lease_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # The relay uses no message priorities: one list per queue, so a worker can
            # take from its queue with one blocking move (relay.state.transport).
            "priority_steps": [0],
            # BRPOP the queues in sorted order, `relay` before `relay.replay`: a free
            # worker thread takes a live message first, a replay only when none waits.
            "queue_order_strategy": "sorted",
            "socket_timeout": 5,
            "socket_connect_timeout": 3,
            "health_check_interval": 30,
            **target.get("broker_transport_options", {}),
        },
        "task_default_queue": keys.QUEUE,
        "task_routes": {keys.TASK_DELIVER: {"queue": keys.QUEUE}},
        "task_create_missing_queues": True,  # the replay lane's queue is named per publish
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # Only a prefork pool enforces this; the thread pool's bound is the task's own
        # deadline and the watchdog in workers/tasks.py. No soft limit: the task does not
        # expect one, and it would dead-letter a batch instead of retrying it.
        "task_time_limit": settings.task_time_limit_s + VISIBILITY_MARGIN_S - 3,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "broker_pool_limit": 10,
    }


def make_celery(settings: Settings, redis_url: str, *, worker: bool = False) -> Celery:
    """A Celery app bound to the relay's broker and settings.

    A worker's app uses relay.state.transport, whose writes still work at maxmemory (they only
    move work already queued) and survive a failover; ingest's does not, so its writes
    stop at a full Redis.
    """
    if worker:
        transport.install()
    app = Celery("relay", set_as_current=False)
    app.conf.update(celery_config(settings, redis_url))
    if not worker:
        # A publisher outside the workers fails within about a second while Redis is gone
        # from the network, as ingest's own client does.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "socket_connect_timeout": redis_conn.ANSWER_CONNECT_TIMEOUT_S,
        }
    app.conf.relay_message_events = settings.message_events
    return app


def queue_of(items: list[Json]) -> str:
    """The queue of a batch: the replay lane when every item is a replayed dead letter."""
    replayed = all(isinstance(i, dict) and i.get("replayed_from") for i in items)
    return keys.REPLAY_QUEUE if items and replayed else keys.QUEUE


class NotReplicated(QueueUnavailable):
    """WAIT found fewer replicas holding the published events than required."""


# What a failed publish raises: kombu's connection errors, redis-py's and the socket's.
PUBLISH_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
    NotReplicated,
)
# What any queue operation can raise when Redis is away: the above and redis-py's own.
QUEUE_ERRORS: tuple[type[Exception], ...] = (*PUBLISH_ERRORS, redis.RedisError, OSError)


# Messages onto a queue with their counts, in one call (see its header). Its KEYS and
# ARGV: relay/state/lua/push.lua.
_PUSH = lua.read("push")


class _Publisher:
    """Items as the keys and arguments of one `_PUSH` call."""

    def __init__(self, message_events: int) -> None:
        self._writer = wire.MessageWriter()
        self._max = message_events

    def _call(
        self,
        items: list[Json],
        counts: list[str],
        how: str = "",
        arg: Any = "",
        *extra: Any,
        message_id: str | None = None,
        per_message: int | None = None,
    ) -> tuple[list[Any], list[Any]]:
        queue = queue_of(items)
        size = per_message or self._max
        messages = self._writer.encode_all(items, size, message_id, queue)
        # kombu pushes on the left and workers pop on the right: first in, first out.
        return [queue, keys.DEPTH_READY, *counts], [len(items), how, arg, *extra, *messages]


class Queue(_Publisher):
    """Publishes items, counted ready, in one script call each (sync Redis client).

    The lane is the items': replayed dead letters go to `keys.REPLAY_QUEUE`. With a
    `message_id`, the same items published again make the same messages (ids
    `<message_id>.<n>`), which the workers settle once (relay.delivery.claims).
    """

    def __init__(self, r: redis.Redis, message_events: int, *, allow_oom: bool = False) -> None:
        super().__init__(message_events)
        # `allow_oom`, a worker's: its publishes move work already in Redis, so they go
        # through at maxmemory too (relay.state.oom), as draining a full Redis needs.
        self._push = r.register_script((oom.header(r) if allow_oom else "") + _PUSH)

    def messages(
        self, items: list[Json], per_message: int | None = None
    ) -> tuple[str, list[bytes]]:
        """The queue of `items` and their messages, encoded but not queued: for a caller
        whose own script pushes them (and counts them ready) with writes of its own."""
        keys_, args = self._call(items, [], per_message=per_message)
        return keys_[0], args[3:]

    def publish(
        self, items: list[Json], *, message_id: str | None = None, per_message: int | None = None
    ) -> None:
        """Queue `items` in messages of at most `per_message` events (default the
        deployment's `message_events`); raise a RedisError if they are not queued."""
        if items:
            keys_, args = self._call(items, [], message_id=message_id, per_message=per_message)
            self._push(keys=keys_, args=args)

    def move(
        self, member: bytes, items: list[Json], message_id: str, received: tuple[str, str]
    ) -> bool:
        """Queue the items of `member`, a member of the delayed set, and remove it there and
        from the index of oldest receipts (`received`: that index's key, the member's id in
        it), in one step; False, publishing nothing, when it was no longer there."""
        counts = [keys.DELAYED, keys.DELAYED_EVENTS, received[0]]
        keys_, args = self._call(items, counts, "move", member, received[1], message_id=message_id)
        return bool(self._push(keys=keys_, args=args))


class AsyncQueue(_Publisher):
    """Ingest's publisher: items, their ready count and this second's ingest rate in one
    script call (asyncio Redis client).

    On the event loop: handing each group to a publishing thread cost more (the hop, and
    the thread contending for the GIL) than the round trip it kept off the loop."""

    def __init__(self, client: aioredis.Redis, message_events: int) -> None:
        super().__init__(message_events)
        self._push = client.register_script(_PUSH)

    async def publish(self, items: list[Json], message_id: str | None = None) -> None:
        """Return once `items` are queued and counted; raise a RedisError if not.

        Tried again only as the client tries every command (relay.state.redis_conn), so a
        Redis that is down fails it within the client's bound. A call sent again is the
        same bytes: if the first did land, the copies carry the same task ids and the
        workers settle each message once (relay.delivery.claims)."""
        rate = status.rate_key(status.Rate.INGESTED, time.time())
        keys_, args = self._call(items, [rate], "rate", status.RATE_TTL_S, message_id=message_id)
        await self._push(keys=keys_, args=args)


def send(
    celery: Celery, items: list[Json], *, retry_policy: dict[str, float] | None = None
) -> None:
    """Queue items through Celery's own `send_task`, in messages of at most `message_events`,
    uncounted: the shape relay.wire's messages must keep."""
    size = int(celery.conf.get("relay_message_events", 500))
    with celery.producer_or_acquire() as producer:
        for start in range(0, len(items), size):
            celery.send_task(
                keys.TASK_DELIVER,
                args=[items[start : start + size]],
                queue=queue_of(items),
                producer=producer,
                retry=True,
                retry_policy=retry_policy or {},  # {}: Celery's default policy
                compression="zlib",  # as relay.wire writes them
            )


def confirm_replicated(client: redis.Redis, replicas: int, timeout_ms: int) -> None:
    """Raise NotReplicated unless WAIT confirms that `replicas` replicas hold everything
    this primary took so far (`AsyncQueue`'s messages included)."""
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.STATS, keys.Stat.REPLICATION_WAITS, 1)
    _confirm(pipe, replicas, timeout_ms)


def _confirm(pipe: Any, replicas: int, timeout_ms: int) -> None:
    # WAIT answers for the writes of its own connection: the write just before it, on the
    # same connection, comes after the publish in the primary's replication stream, so a
    # replica that has it has the published message too.
    pipe.wait(replicas, timeout_ms)
    reached = int(pipe.execute()[-1])
    if reached < replicas:
        raise NotReplicated(f"{reached} of {replicas} replicas confirmed")
