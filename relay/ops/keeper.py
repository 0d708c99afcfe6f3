"""The supervisor's loop, on the standard library alone: `relay worker` and `relay serve
--processes N` become this (by exec) once their children's commands are known, so that
the process that only watches the others holds none of the relay's imports.

`python -S -P relay/ops/keeper.py` reads its children from the environment (SPEC_VAR, which
the children do not inherit): a command line `ps` shows short.

A child may be on demand: not started with the others, but when the supervisor receives
SIGUSR1 (DEMAND_SIGNAL) and it is not running; it may exit when it has nothing left to do,
and is started again only on the next demand. Any child may send the signal: one that
knows when another is needed (a queue with work waiting) gets the supervisor's pid in its
own environment (`Child.env`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from types import FrameType

# A child that dies this soon after its start counts as failing to start; after this
# many such deaths in a row the supervisor gives up rather than loop.
EARLY_DEATH_S = 5.0
MAX_EARLY_DEATHS = 5
STOP_TIMEOUT_S = 20.0


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _prepare_child(nice: int, idle: bool) -> None:
    # Runs in the child between fork and exec (only C calls, no import or lock): its CPU
    # priority, and the kernel sends it SIGTERM when the supervisor dies, even by SIGKILL.
    if nice:
        os.nice(nice)
    if idle and hasattr(os, "SCHED_IDLE"):  # Linux: the CPU no other process wants
        # Refused (a seccomp policy, say), the nice value still holds.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


Say = Callable[[str], None]


# What a child sends the supervisor to have its on-demand children started.
DEMAND_SIGNAL = signal.SIGUSR1


class Child:
    """A process to keep running: what it is called in messages, its command, its
    niceness (0: the supervisor's own CPU priority), whether it runs under Linux's
    SCHED_IDLE policy (only on CPU time no other process wants; `nice` then matters only
    among such processes), whether it runs only on demand (see the module docstring),
    variables added to its environment, and whether the supervisor gives up when it keeps
    dying at start (one that is not essential is only started again, no more often than
    every EARLY_DEATH_S)."""

    # A plain class: dataclasses would add its imports to the keeper's memory.
    __slots__ = ("argv", "env", "essential", "idle", "label", "nice", "on_demand")

    def __init__(
        self, label: str, argv: Sequence[str], nice: int = 0, on_demand: bool = False,
        env: Mapping[str, str] | None = None, idle: bool = False,
        essential: bool = True,
    ) -> None:  # fmt: skip
        self.label, self.argv, self.nice, self.on_demand = label, list(argv), nice, on_demand
        self.env, self.idle, self.essential = dict(env or {}), idle, essential

    def as_dict(self) -> dict[str, object]:
        """The child as JSON-ready keyword arguments of `Child`."""
        return {name: getattr(self, name) for name in self.__slots__}


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
        self._demanded = False
        self._early_deaths = 0

    def _start(self, slot: int) -> None:
        spec = self.specs[slot]
        child = subprocess.Popen(
            list(spec.argv),
            env={**self._env, **spec.env},
            stdin=subprocess.DEVNULL,
            preexec_fn=partial(_prepare_child, spec.nice, spec.idle),
        )
        self._children[slot] = (child, time.monotonic())

    def _stop_signal(self, signum: int, _: FrameType | None) -> None:
        self._stopping = True

    def _demand_signal(self, signum: int, _: FrameType | None) -> None:
        self._demanded = True

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until children keep dying at start (1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_signal)
        # Before any child starts: unhandled, the signal would end this process.
        signal.signal(DEMAND_SIGNAL, self._demand_signal)
        for slot, spec in enumerate(self.specs):
            if not spec.on_demand:
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
            spec = self.specs[slot]
            if spec.on_demand and code == 0:  # it had nothing left to do
                del self._children[slot]
                continue
            early = time.monotonic() - started < EARLY_DEATH_S
            if not spec.essential:
                if early:
                    continue  # started again once EARLY_DEATH_S have passed since its start
                self._say(f"{spec.label} process {child.pid} exited ({code}); starting another")
                self._start(slot)
                continue
            self._early_deaths = self._early_deaths + 1 if early else 0
            if self._early_deaths >= MAX_EARLY_DEATHS:
                self._say(f"{spec.label} processes keep exiting at start (last: {code}); giving up")
                return False
            if spec.on_demand:  # started again on the next demand
                del self._children[slot]
                self._say(f"{spec.label} process {child.pid} exited ({code})")
                continue
            self._say(f"{spec.label} process {child.pid} exited ({code}); starting another")
            self._start(slot)
        if self._demanded and not self._stopping:
            self._demanded = False
            for slot, spec in enumerate(self.specs):
                if spec.on_demand and slot not in self._children:
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


SPEC_VAR = "_RELAY_KEEPER_SPEC"


def spec(children: Sequence[Child], stop_timeout_s: float) -> str:
    """The children and stop timeout as the argument `main` reads."""
    return json.dumps({"children": [c.as_dict() for c in children], "stop_s": stop_timeout_s})


def become(children: Sequence[Child], env: dict[str, str], stop_timeout_s: float) -> None:
    """Replace this process (same pid: signals and the children's parent stay) with a
    supervisor that imported only this module."""
    sys.stdout.flush()
    env = dict(env, **{SPEC_VAR: spec(children, stop_timeout_s)})
    # This file run as a script, without `site` (-S: no site-packages, none of their .pth
    # hooks) and without its own directory on the path (-P): the standard library alone.
    os.execve(sys.executable, [sys.executable, "-S", "-P", os.path.abspath(__file__)], env)


def main() -> int:
    """Run the supervisor the environment describes; its exit status."""
    env = dict(os.environ)
    given = json.loads(env.pop(SPEC_VAR))
    children = [Child(**c) for c in given["children"]]
    say = partial(print, flush=True)
    return Supervisor(children, env, say, given["stop_s"]).run()


if __name__ == "__main__":
    sys.exit(main())
