"""The Celery app's configuration, shared by ingest (which publishes) and workers.

It lives in relay/ so ingest can publish `relay.deliver_batch` by name through Celery's
own machinery without importing workers/.
"""

from __future__ import annotations

from typing import Any

import orjson
from celery import Celery
from kombu import serialization
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from relay import keys, redis_conn, transport
from relay.settings import VISIBILITY_MARGIN_S, Settings


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# Celery's JSON, written by orjson: the same bytes on the wire (plain JSON, any Celery
# consumer reads it), several times faster than the standard library for event batches.
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
            # kombu looks for messages of dead workers every interval x throttle seconds
            # (100 s by default); every 5 s keeps the bound near the visibility timeout.
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # A worker that dies mid-sweep holds the sweep's mutex this long (default 5 min).
            "unacked_mutex_expire": 30,
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

    A worker's app uses relay.transport, whose writes still work at maxmemory (they only
    move work already queued) and survive a failover; ingest's does not, so its writes
    stop at a full Redis.
    """
    if worker:
        transport.install()
    app = Celery("relay", set_as_current=False)
    app.conf.update(celery_config(settings, redis_url))
    app.conf.relay_message_events = settings.message_events
    return app


def queue_of(items: list[dict[str, Any]]) -> str:
    """The queue of a batch: the replay lane when every item is a replayed dead letter."""
    replayed = all(isinstance(i, dict) and i.get("replayed_from") for i in items)
    return keys.REPLAY_QUEUE if items and replayed else keys.QUEUE


def publish(
    celery: Celery,
    items: list[dict[str, Any]],
    *,
    retry_policy: dict[str, float] | None = None,
    message_id: str | None = None,
    queue: str = keys.QUEUE,
    per_message: int | None = None,
) -> None:
    """Queue items as `relay.deliver_batch` messages of at most `message_events` each.

    The one way items enter the queue: ingest, the delayed-set mover and replays. With a
    `message_id`, publishing the same items again makes the same messages (ids
    `<message_id>.<n>`), which the workers settle once (relay.runs). Replays go to
    `keys.REPLAY_QUEUE`, the replay lane, in messages of one request's worth of events
    (`per_message`), so a replay task never holds a worker thread long.
    """
    size = per_message or int(celery.conf.get("relay_message_events", 500))
    with celery.producer_or_acquire() as producer:
        for n, start in enumerate(range(0, len(items), size)):
            celery.send_task(
                keys.TASK_DELIVER,
                args=[items[start : start + size]],
                task_id=f"{message_id}.{n}" if message_id else None,
                queue=queue,
                producer=producer,
                retry=True,
                retry_policy=retry_policy or {},  # {}: Celery's default policy
            )


class NotReplicated(Exception):
    """WAIT found fewer replicas holding the published events than required."""


# What a failed publish raises: kombu's connection errors and the socket's own.
PUBLISH_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    ConnectionError,
    TimeoutError,
    NotReplicated,
)
# What any queue operation can raise when Redis is away: the above and redis-py's own.
QUEUE_ERRORS: tuple[type[Exception], ...] = (*PUBLISH_ERRORS, RedisError, OSError)
