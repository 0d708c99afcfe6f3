"""Supervised processes: `relay serve --processes N` and `relay worker`.

`relay serve --processes N` runs N ingest processes on one port: one Python process
answers on one core, and they share the port through SO_REUSEPORT (the kernel spreads
connections over them).

`relay worker` runs two Celery workers: one of the live queue, and one of the replay
lane at a lower CPU priority (`RELAY_REPLAY_NICE`). In one process, a replay's batches
would hold the interpreter lock while live batches wait; in a process of its own, on a
busy host the kernel gives live work the CPU first, so a replay of many dead letters
takes only what live delivery leaves. Given its own `-Q`, `relay worker` is that one
Celery worker instead.

The supervisor starts its children, starts again one that dies, and on SIGTERM or
SIGINT stops them all (each finishes the work under way: requests, or running tasks)
before it exits. A child is also told to stop if the supervisor itself dies, so none is
left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType

from relay import keys
from relay.settings import VISIBILITY_MARGIN_S, Settings

# A child that dies this soon after its start counts as failing to start; after this
# many such deaths in a row the supervisor gives up rather than loop.
EARLY_DEATH_S = 5.0
MAX_EARLY_DEATHS = 5
STOP_TIMEOUT_S = 20.0


def default_processes() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _prepare_child(nice: int) -> None:
    # Runs in the child between fork and exec (only C calls, no import or lock): its CPU
    # priority, and the kernel sends it SIGTERM when the supervisor dies, even by SIGKILL.
    if nice:
        os.nice(nice)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


Say = Callable[[str], None]


@dataclass(frozen=True)
class Child:
    """A process to keep running: what it is called in messages, its command, its
    niceness (0: the supervisor's own CPU priority)."""

    label: str
    argv: Sequence[str]
    nice: int = 0


class Supervisor:
    """Keeps its children running until told to stop."""

    def __init__(
        self, children: Sequence[Child], env: dict[str, str], say: Say,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.specs = list(children)
        self._env = env
        self._say = say
        self._stop_timeout_s = stop_timeout_s
        self._children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._stopping = False
        self._early_deaths = 0

    def _start(self, slot: int) -> None:
        spec = self.specs[slot]
        child = subprocess.Popen(
            list(spec.argv),
            env=self._env,
            stdin=subprocess.DEVNULL,
            preexec_fn=partial(_prepare_child, spec.nice),
        )
        self._children[slot] = (child, time.monotonic())

    def _stop_signal(self, signum: int, _: FrameType | None) -> None:
        self._stopping = True

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until children keep dying at start (1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_signal)
        for slot in range(len(self.specs)):
            self._start(slot)
        try:
            while not self._stopping:
                time.sleep(0.2)
                if not self._check():
                    return 1
            return 0
        finally:
            self._stop_all()

    def _check(self) -> bool:
        for slot, (child, started) in list(self._children.items()):
            code = child.poll()
            if code is None or self._stopping:
                continue
            early = time.monotonic() - started < EARLY_DEATH_S
            self._early_deaths = self._early_deaths + 1 if early else 0
            label = self.specs[slot].label
            if self._early_deaths >= MAX_EARLY_DEATHS:
                self._say(f"{label} processes keep exiting at start (last: {code}); giving up")
                return False
            self._say(f"{label} process {child.pid} exited ({code}); starting another")
            self._start(slot)
        return True

    def _stop_all(self) -> None:
        children = [child for child, _ in self._children.values()]
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        for child in children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def serve(settings: Settings, redis_url: str, processes: int | None, say: Say) -> int:
    """`relay serve`: one ingest process here, or a supervisor of several; the exit status."""
    count = settings.ingest_processes if processes is None else processes
    count = count or default_processes()
    if count > 1:
        # The children share the resolved Redis (an embedded one is started once, here).
        env = dict(os.environ, RELAY_REDIS_URL=redis_url)
        say(f"relay ingest on http://{settings.host}:{settings.port} ({count} processes)")
        command = [sys.executable, "-m", "relay.ops.cli", "serve", "--processes", "1"]
        one = Child("ingest", [*command, "--supervised"])
        return Supervisor([one] * count, env, say).run()
    from relay.ingest import app as ingest
    from relay.ops import server

    with asyncio.Runner(loop_factory=_loop_factory(settings)) as runner:
        runner.run(
            ingest.serve(
                server.create_app(settings, redis_url),
                ready=lambda: say(f"relay ingest on http://{settings.host}:{settings.port}"),
            )
        )
    return 0


def worker(settings: Settings, redis_url: str, celery_args: Sequence[str], say: Say) -> int:
    """`relay worker`: a live and a replay Celery worker, supervised (see the module
    docstring), or, given its own `-Q`, that one worker in this process."""
    env = dict(os.environ, RELAY_REDIS_URL=redis_url)
    command = [
        # --quiet: no banner; Celery's own log lines come through structlog (relay.logs).
        sys.executable, "-m", "celery", "--quiet", "-A", "workers.app", "worker",
        "--pool", "threads", "-c", str(settings.worker_concurrency),
        # Nothing of the relay listens to other workers or to their heartbeat events.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", settings.log_level.upper(),
    ]  # fmt: skip
    if any(a in ("-Q", "--queues") or a.startswith(("-Q", "--queues=")) for a in celery_args):
        os.execvpe(sys.executable, [*command, *celery_args], env)
    live = Child("live worker", [*command, "-Q", keys.QUEUE, *celery_args])
    name = _option(celery_args, "-n", "--hostname") or "celery@%h"
    replay = Child(
        "replay worker",
        [*command, "-Q", keys.REPLAY_QUEUE, *celery_args, "-n", f"replay-{name}"],
        nice=settings.replay_nice,
    )
    # Celery's warm shutdown lets running tasks finish: up to a task's whole time.
    stop_s = settings.task_time_limit_s + VISIBILITY_MARGIN_S
    return Supervisor([live, replay], env, say, stop_timeout_s=stop_s).run()


def _option(args: Sequence[str], short: str, long: str) -> str | None:
    """The last value given to an option as `-n V`, `--name V` or `--name=V`."""
    found = None
    for i, arg in enumerate(args):
        if arg in (short, long) and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(long + "="):
            found = arg.split("=", 1)[1]
    return found


def _loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not settings.ingest_uvloop:
        return None
    try:
        import uvloop
    except ImportError:  # not installed on this platform (Windows): asyncio's own loop
        return None
    return uvloop.new_event_loop
