"""A worker process's lease: while it beats, the messages it holds are its own.

A worker takes a message off the queue into its own taken list in one step (BLMOVE, see
relay.state.transport), then records it as unacked and in its held set in one script: at
every moment a message is in Redis (the queue, a taken list, or `unacked`), never only in
a socket or in a worker's memory.

Each worker process has an id and a lease in `keys.WORKERS` (a deadline on Redis's
clock), renewed by a heartbeat thread every quarter lease. When the lease lapses (the
process died, or lost Redis for longer than a lease), any worker's sweep puts its taken
list back on the queues and restores the messages of its held set, and a run it had
claimed can be taken over at once (relay.delivery.runs) rather than after the claim's TTL.
A live worker, however slow its task, keeps beating, so nothing it works on is handed out.

Silence: when no worker reached Redis for longer than a lease (Redis was down or
restarted, or every worker was cut off), nobody could renew. The first beat or sweep after
it gives every lease that was live when the silence began a fresh lease, so an outage
alone never makes a live worker look dead.

Keys are built inside the sweep from the ids it finds: the relay runs on one Redis
(primary and replicas), never on a cluster.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from typing import Any

import structlog

from relay import keys
from relay.state import oom

log = structlog.get_logger("relay.lease")

# A lapsed worker stays registered this long, so that a claim of one of its runs sees it
# lapsed until the claim's own TTL has run out anyway.
FORGET_MS = 600_000

# KEYS[1]: workers, KEYS[2]: the last beat. ARGV[1]: lease_ms. Sets `now` (ms).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]))
if last and now - last > lease then
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], last, '+inf')) do
    redis.call('ZADD', KEYS[1], now + lease, w)
  end
end
redis.call('SET', KEYS[2], now)
"""

# Puts every message of a taken list back at the head of its queue (its routing key, as
# kombu's restore does; `fallback` if unreadable), oldest first.
_PUT_BACK = """
local function put_back(taken, fallback)
  while true do
    local m = redis.call('LPOP', taken)
    if not m then return end
    local queue = fallback
    local ok, p = pcall(cjson.decode, m)
    if ok and type(p) == 'table' and type(p.properties) == 'table' then
      local d = p.properties.delivery_info
      if type(d) == 'table' and type(d.routing_key) == 'string' and d.routing_key ~= '' then
        queue = d.routing_key
      end
    end
    redis.call('RPUSH', queue, m)
  end
end
"""

# KEYS: workers, last beat. ARGV: lease_ms, worker id.
# Returns 0 renewed, 1 lapsed (renewed now), 2 new.
_BEAT = (
    _NOW
    + """
local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
if not d then return 2 end
if tonumber(d) < now then return 1 end
return 0
"""
)

# KEYS: workers, last beat, own taken list, own held set. ARGV: lease_ms, worker id,
# fallback queue. Starts (or restarts) consuming: renews the lease, puts back what a
# previous connection of this process took but never recorded, and returns the delivery
# tags it still holds (a closed connection could not restore them).
_ENLIST = (
    _NOW
    + _PUT_BACK
    + """
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
put_back(KEYS[3], ARGV[3])
return redis.call('SMEMBERS', KEYS[4])
"""
)

# KEYS: workers, last beat, kombu's unacked index. ARGV: lease_ms, own worker id,
# fallback queue, the worker key prefix, taken suffix, held suffix, visibility_s, limit.
# Puts back the taken lists of workers whose lease lapsed and returns the delivery tags
# to restore: theirs, and any unacked past the visibility timeout (kombu's own rule).
_SWEEP = (
    _NOW
    + _PUT_BACK
    + f"local FORGET_MS = {FORGET_MS}\n"
    + """
local out = {}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - FORGET_MS, '(' .. now)) do
  if w ~= ARGV[2] then
    put_back(ARGV[4] .. w .. ARGV[5], ARGV[3])
    local held = ARGV[4] .. w .. ARGV[6]
    for _, tag in ipairs(redis.call('SMEMBERS', held)) do table.insert(out, tag) end
    redis.call('DEL', held)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - FORGET_MS)
local ceil = now / 1000 - tonumber(ARGV[7])
for _, tag in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ceil, 'LIMIT', 0, ARGV[8])) do
  table.insert(out, tag)
end
return out
"""
)

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


def _script(r: Any, text: str) -> Any:
    # Allowed at maxmemory (Redis 7+): these only move work already in Redis. The flags
    # are asked once per client (relay.state.oom): callers keep their client.
    return r.register_script(oom.header(r) + text)


def beat(r: Any, lease_s: float) -> int:
    """Renew this process's lease: 0 renewed, 1 it had lapsed, 2 it was new."""
    return int(_script(r, _BEAT)(keys=[keys.WORKERS, keys.WORKERS_BEAT],
                                 args=[int(lease_s * 1000), worker_id()]))  # fmt: skip


def enlist(r: Any, lease_s: float, fallback_queue: str) -> list[bytes]:
    """Start consuming: renew the lease, put back this process's unrecorded takes, and
    return the delivery tags it still holds (for the caller to restore)."""
    found = _script(r, _ENLIST)(
        keys=[keys.WORKERS, keys.WORKERS_BEAT, taken_key(), held_key()],
        args=[int(lease_s * 1000), worker_id(), fallback_queue],
    )
    return list(found)


def sweep(
    r: Any, lease_s: float, *, unacked_index: str, visibility_s: float, limit: int,
    fallback_queue: str,
) -> list[bytes]:  # fmt: skip
    """Put back the taken lists of lapsed workers; return the delivery tags to restore
    (theirs, and any unacked past the visibility timeout)."""
    found = _script(r, _SWEEP)(
        keys=[keys.WORKERS, keys.WORKERS_BEAT, unacked_index],
        args=[int(lease_s * 1000), worker_id(), fallback_queue, keys.WORKER,
              ":taken", ":held", visibility_s, limit],
    )  # fmt: skip
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
