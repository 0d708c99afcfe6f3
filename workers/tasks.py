"""The relay's one Celery task: thin, like a web view. The work is relay.delivery."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import redis
import structlog
from celery import Task, signals

from relay import keys
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


@app.task(name=keys.TASK_DELIVER, bind=True, acks_on_failure_or_timeout=False)
def deliver_batch(self: Task[Any, None], items: list[dict[str, Any]]) -> None:
    """Deliver one batch of queued items to ChurnZero (see relay.delivery)."""
    structlog.contextvars.bind_contextvars(task_id=self.request.id)
    started = time.perf_counter()
    try:
        report = _delivery().deliver(items)
    except (redis.RedisError, OSError) as exc:
        retries = self.request.retries
        log.warning("batch_deferred", error=type(exc).__name__, events=len(items), retries=retries)
        raise self.retry(
            exc=exc, countdown=min(2**retries, _RETRY_CAP_S), max_retries=None
        ) from exc
    finally:
        structlog.contextvars.unbind_contextvars("task_id")
    log.info("batch", ms=round((time.perf_counter() - started) * 1000, 1), **report.as_log())
