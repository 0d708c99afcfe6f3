"""A worker process's lease: while it beats, the messages it holds are its own.

A worker takes a message off the queue into its own taken list in one step (BLMOVE, see
relay.state.transport), then records it as unacked and in its held set in one script: at
every moment a message is in Redis (the queue, a taken list, or `unacked`), never only in
a socket or in a worker's memory.

Each worker process has an id and a lease in `keys.WORKERS` (a deadline on Redis's
clock), renewed by a heartbeat thread every quarter lease. When the lease lapses (the
process died, or lost Redis for longer than a lease), any worker's sweep puts its taken
list back on the queues and restores the messages of its held set, and a run it had
claimed can be taken over at once (relay.delivery.claims) rather than after the claim's TTL.
A live worker, however slow its task, keeps beating, so nothing it works on is handed out.

Silence: when no worker reached Redis for longer than a lease (Redis was down or
restarted, or every worker was cut off), nobody could renew. The first beat or sweep after
it gives every lease that was live when the silence began a fresh lease, so an outage
alone never makes a live worker look dead.

The script is relay/state/lua/lease.lua.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from typing import Any

import structlog

from relay import keys
from relay.state import lua, oom

log = structlog.get_logger("relay.lease")

# A lapsed worker stays registered this long, so that a claim of one of its runs sees it
# lapsed until the claim's own TTL has run out anyway.
FORGET_MS = 600_000

# The script of every lease command; its header names each KEYS and ARGV entry.
_LEASE = lua.read("lease")


_id: tuple[int, str] = (0, "")


def worker_id() -> str:
    """This process's worker id (a new one in a forked child)."""
    global _id
    if _id[0] != os.getpid():
        _id = (os.getpid(), uuid.uuid4().hex[:16])
    return _id[1]


def taken_key() -> str:
    """This process's taken list."""
    return keys.worker_taken(worker_id())


def held_key() -> str:
    """This process's held set."""
    return keys.worker_held(worker_id())


def _run(r: Any, command: str, keys_: list[str], *args: Any) -> Any:
    # Allowed at maxmemory (Redis 7+): these only move work already in Redis. The flags
    # are asked once per client (relay.state.oom): callers keep their client.
    script = r.register_script(oom.header(r) + _LEASE)
    return script(keys=keys_, args=[command, *args])


def beat(r: Any, lease_s: float) -> int:
    """Renew this process's lease: 0 renewed, 1 it had lapsed, 2 it was new."""
    found = _run(r, "beat", [keys.WORKERS, keys.WORKERS_BEAT], int(lease_s * 1000), worker_id())
    return int(found)


def enlist(r: Any, lease_s: float, fallback_queue: str) -> list[bytes]:
    """Start consuming: renew the lease, put back this process's unrecorded takes, and
    return the delivery tags it still holds (for the caller to restore)."""
    found = _run(r, "enlist", [keys.WORKERS, keys.WORKERS_BEAT, taken_key(), held_key()],
                 int(lease_s * 1000), worker_id(), fallback_queue)  # fmt: skip
    return list(found)


def sweep(
    r: Any, lease_s: float, *, unacked_index: str, visibility_s: float, limit: int,
    fallback_queue: str,
) -> list[bytes]:  # fmt: skip
    """Put back the taken lists of lapsed workers; return the delivery tags to restore
    (theirs, and any unacked past the visibility timeout)."""
    found = _run(r, "sweep", [keys.WORKERS, keys.WORKERS_BEAT, unacked_index],
                 int(lease_s * 1000), worker_id(), fallback_queue, keys.WORKER, ":taken",
                 ":held", visibility_s, limit, FORGET_MS)  # fmt: skip
    return list(found)


class Heartbeat:
    """A daemon thread renewing this process's lease every quarter lease, while any of
    its consumers is open."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def keep(self, owner: Any, client: Any) -> None:
        """Beat with `client` while `owner` (a consumer) lives."""
        with self._lock:
            self._clients[owner] = client
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="relay-lease", daemon=True)
                self._thread.start()

    def drop(self, owner: Any) -> None:
        """`owner` closed: beat no more for it."""
        with self._lock:
            self._clients.pop(owner, None)

    def _run(self) -> None:
        every = self.lease_s / 4
        wait = threading.Event().wait
        while True:
            wait(every)
            with self._lock:
                clients = list(self._clients.values())
            if not clients:
                continue
            try:
                if beat(clients[-1], self.lease_s) == 1:
                    log.warning("worker_lease_lapsed", worker=worker_id())
            except Exception as exc:  # Redis away: the next beat tries again
                log.warning("worker_lease_beat_failed", error=type(exc).__name__)


_heartbeats: dict[float, Heartbeat] = {}


def heartbeat(lease_s: float) -> Heartbeat:
    """The process's heartbeat for leases of `lease_s`."""
    found = _heartbeats.get(lease_s)
    if found is None:
        found = _heartbeats[lease_s] = Heartbeat(lease_s)
    return found
