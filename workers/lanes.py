"""The replay lane on demand, under `relay worker` (relay.ops.supervise).

The lane's Celery worker is a process of its own, started by the supervisor only when
asked. The live worker asks (relay.ops.keeper.DEMAND_SIGNAL, SIGUSR1, to the supervisor)
while replays wait in the `relay.replay` queue: from `relay dlq replay`, from the delayed
set (the mover brings due replay batches back to the queue) or from a dead lane process
(a worker's sweep puts what it took back on the queue), so watching the queue covers
all three. The lane's worker, once it has run no task for `RELAY_REPLAY_IDLE_S` and the
queue is empty, stops as on SIGTERM (Celery's warm shutdown) and exits 0; the next
demand starts it again.

Outside that supervisor (no variable set), neither thread runs: a Celery worker started
by hand consumes its queues for as long as it runs.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import structlog

from relay import keys
from relay.settings import LANE_DEMAND_VAR, LANE_ON_DEMAND_VAR
from relay.state import broker
from workers import tasks
from workers.app import beside_the_worker, settings, state

log = structlog.get_logger("relay.worker")
# How often the live worker looks for waiting replays (one LLEN): the lane starts at most
# this late, which a replay of dead letters does not notice.
DEMAND_EVERY_S = 2.0
IDLE_CHECK_S = 1.0
# The supervisor's own signal (relay.ops.keeper.DEMAND_SIGNAL; workers/ imports no ops).
DEMAND_SIGNAL = signal.SIGUSR1


def _supervisor() -> int | None:
    """The pid to ask for the lane, if this process's parent is the supervisor that
    said so: to any other process the signal would be fatal."""
    value = os.environ.get(LANE_DEMAND_VAR, "")
    return int(value) if value.isdigit() and int(value) == os.getppid() else None


def ask_while_replays_wait(supervisor: int) -> None:
    """Signal the supervisor every DEMAND_EVERY_S while replays are queued (it starts the
    lane if it is not running, and ignores the signal otherwise)."""
    while True:
        try:
            waiting = state.llen(keys.REPLAY_QUEUE)
        except broker.QUEUE_ERRORS:
            waiting = 0
        if waiting:
            try:
                os.kill(supervisor, DEMAND_SIGNAL)
            except ProcessLookupError:  # the supervisor is gone, and this process with it
                return
        time.sleep(DEMAND_EVERY_S)


def exit_when_idle() -> None:
    """Stop this worker (warm shutdown) once no task has run for `replay_idle_s` and the
    replay queue is empty."""
    while True:
        time.sleep(IDLE_CHECK_S)
        idle = tasks.idle_for_s()
        if idle < settings.replay_idle_s:
            continue
        try:
            waiting = state.llen(keys.REPLAY_QUEUE)
        except broker.QUEUE_ERRORS:
            continue
        if not waiting:
            log.info("replay_lane_idle", idle_s=round(idle, 1))
            os.kill(os.getpid(), signal.SIGTERM)
            return


if (_pid := _supervisor()) is not None:
    beside_the_worker("relay-lane-demand")(functools.partial(ask_while_replays_wait, _pid))
if os.environ.get(LANE_ON_DEMAND_VAR):
    beside_the_worker("relay-lane-idle")(exit_when_idle)
