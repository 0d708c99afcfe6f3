"""Supervised processes: `relay serve --processes N` and `relay worker`.

`relay serve --processes N` runs N ingest processes on one port: one Python process
answers on one core, and they share the port through SO_REUSEPORT (the kernel spreads
connections over them).

`relay worker` runs two Celery workers: one of the live queue, and one of the replay
lane at a lower CPU priority (`RELAY_REPLAY_NICE`, and Linux's SCHED_IDLE policy unless
`RELAY_REPLAY_SCHED_IDLE=false`). In one process, a replay's batches
would hold the interpreter lock while live batches wait; in a process of its own, on a
busy host the kernel gives live work the CPU first, so a replay of many dead letters
takes only what live delivery leaves. The replay lane's process runs on demand: the live
worker asks for it while replays are queued (workers/lanes.py), and it exits after
`RELAY_REPLAY_IDLE_S` with nothing to do, so a worker with no replay holds the memory of
one Celery process, not two. Given its own `-Q`, `relay worker` is that one Celery
worker instead, always running. Otherwise, unless RELAY_ARCHIVE or RELAY_WORKER_ARCHIVER is
false, another child is the archiver (`python -m relay.archive`, relay.archive.archiver): a process
of its own, so that its imports and its writes stay out of delivery, as nice as the
replay lane's, and one the supervisor restarts without ever giving up on the workers for
it.

The supervisor starts its children, starts again one that dies, and on SIGTERM or
SIGINT stops them all (each finishes the work under way: requests, or running tasks)
before it exits. A child is also told to stop if the supervisor itself dies, so none is
left behind. Once the children's commands are known, the process becomes (by exec, same
pid) the small supervisor of relay.ops.keeper, which imports only the standard library;
not when it started the embedded Redis, which it stops at its own exit.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from relay import keys
from relay.ops.keeper import STOP_TIMEOUT_S, Child, Say, Supervisor, become
from relay.settings import LANE_DEMAND_VAR, LANE_ON_DEMAND_VAR, VISIBILITY_MARGIN_S, Settings
from relay.state import embedded


def default_processes() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        return _supervise([one] * count, env, say)
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
    # glibc gives each thread that allocates an arena of its own, and an arena keeps what
    # was freed in it: the pool threads' allocations take turns under the interpreter
    # lock anyway, so two arenas hold less memory at no cost in contention.
    env.setdefault("MALLOC_ARENA_MAX", "2")
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
    # This pid stays the supervisor's: `become` execs in place.
    demand = {LANE_DEMAND_VAR: str(os.getpid())}
    live = Child("live worker", [*command, "-Q", keys.QUEUE, *celery_args], env=demand)
    name = _option(celery_args, "-n", "--hostname") or "celery@%h"
    replay = Child(
        "replay worker",
        [*command, "-Q", keys.REPLAY_QUEUE, *celery_args, "-n", f"replay-{name}"],
        nice=settings.replay_nice,
        idle=settings.replay_sched_idle,
        on_demand=True,
        env={LANE_ON_DEMAND_VAR: "1"},
    )
    children = [live, replay]
    if settings.archive and settings.worker_archiver:
        # At the replay lane's CPU priority: on a busy host, delivery gets the CPU first
        # and the archiver catches up when it is idle (its records wait in Redis).
        archiver = [sys.executable, "-m", "relay.archive"]
        children.append(Child("archiver", archiver, nice=settings.replay_nice, essential=False))
    # Celery's warm shutdown lets running tasks finish: up to a task's whole time.
    stop_s = settings.task_time_limit_s + VISIBILITY_MARGIN_S
    return _supervise(children, env, say, stop_s)


def _supervise(
    children: Sequence[Child], env: dict[str, str], say: Say, stop_timeout_s: float | None = None
) -> int:
    """Watch the children: as the small keeper process (exec), unless this process owns
    the embedded Redis, which it must stop at its exit."""
    stop_s = STOP_TIMEOUT_S if stop_timeout_s is None else stop_timeout_s
    if not embedded.owns_server():
        become(children, env, stop_s)
    return Supervisor(children, env, say, stop_s).run()


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
