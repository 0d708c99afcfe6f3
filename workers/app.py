"""The Celery app of the relay's workers: `celery -A workers.app worker` (or `relay worker`).

Settings come from the environment (`RELAY_*`) once, at import, as Celery loads this
module. Besides running `relay.deliver_batch`, each worker process runs the mover that
brings due members back from the delayed set.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from celery import signals

from relay import logs
from relay.delivery.delayed import Mover
from relay.errors import RelayError
from relay.mapping import load_mapping
from relay.settings import load_settings
from relay.state import broker, embedded, parking, redis_conn

try:
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    redis_url = embedded.resolve_url(settings.redis_url, settings.state_dir)
    mapping = load_mapping(settings.mapping_file)  # a bad file stops the worker at start
    settings.require_app_key()  # without it ChurnZero answers 200 and drops every command
except RelayError as exc:
    # One line for the operator, not a traceback through Celery's app loader.
    sys.exit(f"relay worker: {exc}")

app = broker.make_celery(settings, redis_url, worker=True)
app.conf.include = ["workers.tasks", "workers.lanes"]
# Messages it cannot run are dead-lettered, never dropped or handed out again forever.
app.conf.worker_consumer = "workers.consumer:Consumer"
state = redis_conn.sync_client(settings, redis_url, socket_timeout=10, socket_connect_timeout=5)

log = structlog.get_logger("relay.worker")
_stop = threading.Event()
# Expiry is by the hour, and a user parked in a race with their own group call is rare:
# a sweep now and then is on time for both.
PARKING_SWEEP_S = 30.0


def beside_the_worker(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Run the decorated function in a daemon thread of its own, named `name`, once the
    worker is ready."""

    def decorate(target: Callable[[], None]) -> Callable[[], None]:
        def start(**_: Any) -> None:
            threading.Thread(target=target, name=name, daemon=True).start()

        signals.worker_ready.connect(start, weak=False)
        return target

    return decorate


# A message of 500 events parses into tens of thousands of small objects, and each 700
# allocations start a collection; the full ones walk every object of the modules Celery,
# pydantic and the relay import, work that frees nothing. Fewer young collections, and the start-up
# heap frozen out of the full ones (gc.freeze, once the worker is ready): a batch's
# objects die by reference count, not by the collector, so memory holds the same.
GC_THRESHOLDS = (50_000, 20, 20)


@signals.worker_ready.connect
def _tune_gc(**_: Any) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# With nothing due, the mover looks again when the next member is due, or after this long at
# most: a member added meanwhile comes back at most this late, and an idle worker asks
# Redis once a second.
MOVER_IDLE_S = 1.0


@beside_the_worker("relay-mover")
def _move_forever() -> None:
    mover = Mover(state, broker.Queue(state, settings.message_events, allow_oom=True))
    sweep_at = 0.0
    while not _stop.is_set():
        try:
            moved = mover.move_due()
            if time.monotonic() >= sweep_at:  # parked traits past their time, counted
                sweep_at = time.monotonic() + PARKING_SWEEP_S
                if expired := parking.expire_due(state):
                    log.info("parked_traits_expired", traits=expired)
                if released := parking.release_known(state):
                    log.info("parked_traits_released", users=released)
        except broker.QUEUE_ERRORS as exc:
            log.warning("mover_error", error=type(exc).__name__)
            moved = 0
            _stop.wait(2)
        except Exception:
            # Whatever it was, the mover must live on: without it no retry ever comes back.
            log.exception("mover_error")
            moved = 0
            _stop.wait(2)
        if moved:
            log.info("moved_due", events=moved)
        else:
            due_in = mover.next_due_in_s
            _stop.wait(MOVER_IDLE_S if due_in is None else min(max(due_in, 0.01), MOVER_IDLE_S))


@signals.worker_shutdown.connect
def _stop_mover(**_: Any) -> None:
    _stop.set()
