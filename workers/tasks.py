"""The relay's one Celery task: thin, like a web view. The work is relay.delivery.batch.

How a message leaves Redis, and nothing else:
- settled (delivered, skipped, delayed, dead-lettered, in one MULTI with its run's
  `settled` mark), then acked;
- given back with `Reject(requeue=True)` when Redis fails or another run of it holds the
  lease. If even that fails (Redis is down), kombu leaves it in `unacked` and hands it
  out again when its connection comes back or after the visibility timeout.
Never `task.retry()`: when Celery cannot publish the retry copy it rejects the message
without requeue, and kombu deletes it. Celery's time limits do nothing in a thread pool,
so a watchdog bounds a task instead (see `_watch`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import structlog
from celery import Task, signals
from celery.exceptions import Reject

from relay.delivery.batch import Delivery, MessageBusy
from relay.settings import VISIBILITY_MARGIN_S
from relay.state import broker
from workers.app import app, beside_the_worker, mapping, settings, state

log = structlog.get_logger("relay.worker")
_local = threading.local()
# What gives a message back: Redis away, or another run of it still holding its lease.
_GIVE_BACK: tuple[type[Exception], ...] = (*broker.QUEUE_ERRORS, MessageBusy)
# A message given back while Redis restarts would come straight back: wait a little.
REQUEUE_PAUSE_S = 1.0
# A task still running this long is hung (its sends stopped at the time limit): past it,
# its lease would lapse and a redelivered copy could run beside it.
HUNG_AFTER_S = settings.task_time_limit_s + VISIBILITY_MARGIN_S - 3

_all: list[Delivery] = []
_running: dict[int, tuple[float, str]] = {}  # thread id -> (started, task id)
_last_ended = time.monotonic()  # or this module's import, before any task


def idle_for_s() -> float:
    """Seconds since a task last ran in this process (0 while one runs)."""
    return 0.0 if _running else time.monotonic() - _last_ended


def _delivery() -> Delivery:
    # One per pool thread: each owns an event loop and a ChurnZero connection pool.
    found: Delivery | None = getattr(_local, "delivery", None)
    if found is None:
        found = _local.delivery = Delivery(settings, state, mapping)
        _all.append(found)
    return found


@beside_the_worker("relay-watchdog")
def _watch() -> None:
    # A hung task (a Redis call that never returns, a bug) would hold its message past
    # its lease. Exit instead, as prefork's hard time limit would: kombu hands every
    # message of this process out again, and their runs skip what was delivered.
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        for started, task_id in list(_running.values()):
            if now - started > HUNG_AFTER_S:
                log.critical("task_hung_exiting", task_id=task_id, after_s=round(now - started))
                os._exit(70)


@signals.worker_shutdown.connect
def _close_pools(**_: Any) -> None:
    # The pool threads are idle by now: close their connections cleanly.
    for delivery in _all:
        with contextlib.suppress(Exception):
            delivery.close()


@app.task(name="relay.deliver_batch", bind=True, acks_on_failure_or_timeout=False)
def deliver_batch(self: Task[Any, None], items: Any) -> None:
    """Deliver one batch of queued items to ChurnZero (see relay.delivery.batch)."""
    global _last_ended
    task_id = str(self.request.id)
    structlog.contextvars.bind_contextvars(task_id=task_id)
    started = time.perf_counter()
    _running[threading.get_ident()] = (time.monotonic(), task_id)
    try:
        report = _delivery().deliver(items if isinstance(items, list) else [items], task_id)
    except _GIVE_BACK as exc:
        log.warning("batch_returned", error=type(exc).__name__, redelivered=_redelivered(self))
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(exc, requeue=True) from exc
    except Exception as exc:
        # Not even dead-lettering worked (relay.delivery.batch dead-letters what it cannot
        # handle). Celery would drop a failed message: give it back instead.
        log.exception("batch_unsettled")
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(exc, requeue=True) from exc
    finally:
        _last_ended = time.monotonic()
        _running.pop(threading.get_ident(), None)
        structlog.contextvars.unbind_contextvars("task_id")
    log.info("batch", ms=round((time.perf_counter() - started) * 1000, 1), **report.as_log())


def _redelivered(task: Task[Any, None]) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))
