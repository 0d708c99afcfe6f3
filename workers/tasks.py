"""The relay's one Celery task: thin, like a web view. The work is relay.delivery."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import redis
import structlog
from celery import Task, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded

from relay import broker, deadletter, keys
from relay.delivery import Delivery
from workers.app import app, mapping, settings, state

log = structlog.get_logger("relay.worker")
_local = threading.local()
# A batch that fails for want of Redis is retried soon (far below the visibility timeout);
# if even that publish fails, the message stays unacked and Redis hands it out again.
_RETRY_CAP_S = 30


_all: list[Delivery] = []


def _delivery() -> Delivery:
    # One per pool thread: each owns an event loop and a ChurnZero connection pool.
    found: Delivery | None = getattr(_local, "delivery", None)
    if found is None:
        found = _local.delivery = Delivery(settings, state, mapping)
        _all.append(found)
    return found


@signals.worker_shutdown.connect
def _close_pools(**_: Any) -> None:
    # The pool threads are idle by now: close their connections cleanly.
    for delivery in _all:
        with contextlib.suppress(Exception):
            delivery.close()


def _retry(task: Task[Any, None], exc: Exception) -> Exception:
    retries = task.request.retries
    log.warning("batch_deferred", error=type(exc).__name__, retries=retries)
    try:
        return task.retry(exc=exc, countdown=min(2**retries, _RETRY_CAP_S), max_retries=None)
    except Reject:
        # Celery could not publish the retry (Redis away, or failing over) and would reject
        # the message without requeue, dropping it once a Redis answers again. Requeue it;
        # if Redis is still away the message stays unacked and returns after the
        # visibility timeout.
        raise Reject(exc, requeue=True) from exc


def _dead_letter(items: Any, exc: Exception) -> None:
    batch = items if isinstance(items, list) else [items]
    error = f"{type(exc).__name__}: {exc}"[:500]
    deadletter.add(state, [
        deadletter.new_entry(i if isinstance(i, dict) else {"event": i}, "worker_error",
                             errors=[error])
        for i in batch
    ])  # fmt: skip


@app.task(name=keys.TASK_DELIVER, bind=True, acks_on_failure_or_timeout=False)
def deliver_batch(self: Task[Any, None], items: list[dict[str, Any]]) -> None:
    """Deliver one batch of queued items to ChurnZero (see relay.delivery)."""
    structlog.contextvars.bind_contextvars(task_id=self.request.id)
    started = time.perf_counter()
    try:
        report = _delivery().deliver(items)
    except (redis.RedisError, OSError, SoftTimeLimitExceeded) as exc:
        raise _retry(self, exc) from exc
    except Exception as exc:
        # Celery would drop a failed message (late ack, no requeue): keep its events as
        # dead letters instead, whatever went wrong (a malformed message, a bug).
        log.exception("batch_failed", events=len(items) if isinstance(items, list) else 1)
        try:
            _dead_letter(items, exc)
        except broker.QUEUE_ERRORS as store_exc:
            raise _retry(self, store_exc) from exc
        return
    finally:
        structlog.contextvars.unbind_contextvars("task_id")
    log.info("batch", ms=round((time.perf_counter() - started) * 1000, 1), **report.as_log())
