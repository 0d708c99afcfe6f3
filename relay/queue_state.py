"""How much is where: queue depths, oldest age, throttle state and counters, from Redis.

Read by `/metrics`, `/readyz`, `relay status` and the admin page alike.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from relay import keys
from relay.reasons import Reason


@dataclass
class Snapshot:
    """The deployment's queue at one moment."""

    depth: dict[str, int]
    messages: int
    oldest_age_s: float
    paused_for_s: float
    dead_by_reason: dict[str, int]
    stats: dict[str, int] = field(default_factory=dict)
    memory_fraction: float = 0.0  # Redis used_memory / maxmemory; 0 when unlimited


def _int(value: Any) -> int:
    return max(int(value or 0), 0)


def ready_events(counted: Any, messages: Any) -> int:
    """Events ready in the queue: the counter, believed only while the queue has messages.

    The counter can drift when a process dies between publishing and counting, or a
    message is redelivered; Celery's own list says for sure when the queue is empty.
    """
    return _int(counted) if _int(messages) else 0


def backlog(counted_ready: Any, delayed: Any, messages: Any) -> int:
    """Events waiting for delivery (ready and delayed): what the high-water mark limits."""
    return ready_events(counted_ready, messages) + _int(delayed)


def memory_fraction(memory: dict[str, Any]) -> float:
    """used_memory / maxmemory from INFO memory; 0 when maxmemory is 0 (unlimited)."""
    maxmemory = _int(memory.get("maxmemory"))
    return _int(memory.get("used_memory")) / maxmemory if maxmemory else 0.0


def _oldest_received(message: bytes | None) -> float | None:
    # Read-only peek at the oldest Celery message (kombu's Redis envelope, protocol 2
    # body: [args, kwargs, embed]) for the receipt time of its first event.
    if not message:
        return None
    try:
        envelope = orjson.loads(message)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = orjson.loads(body)[0]
        return float(args[0][0]["received_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def snapshot(r: Any, now: float | None = None) -> Snapshot:
    """Read everything in one round trip (sync redis client)."""
    now = time.time() if now is None else now
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.DEPTH_READY)
    pipe.get(keys.DEPTH_INFLIGHT)
    pipe.get(keys.DELAYED_EVENTS)
    pipe.llen(keys.QUEUE)
    pipe.lindex(keys.QUEUE, -1)
    pipe.llen(keys.REPLAY_QUEUE)
    pipe.get(keys.PAUSE_UNTIL)
    pipe.hgetall(keys.STATS)
    pipe.hlen(keys.CELERY_UNACKED)
    pipe.info("memory")
    for reason in Reason:
        pipe.zcard(keys.dlq_reason(reason))
    ready, inflight, delayed, live, oldest, replay, pause, stats, unacked, memory, *dead = (
        pipe.execute()
    )
    messages = _int(live) + _int(replay)
    if not unacked:  # as for ready_events: nothing unacked, nothing in flight
        inflight = 0
    dead_by_reason = {reason.value: _int(d) for reason, d in zip(Reason, dead, strict=True)}
    received = _oldest_received(oldest)
    return Snapshot(
        depth={
            "ready": ready_events(ready, messages),
            "in_flight": _int(inflight),
            "delayed": _int(delayed),
            "dead": sum(dead_by_reason.values()),
        },
        messages=_int(messages),
        oldest_age_s=max(now - received, 0.0) if received else 0.0,
        paused_for_s=max(float(pause or 0) / 1000 - now, 0.0),
        dead_by_reason=dead_by_reason,
        stats={(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in stats.items()},
        memory_fraction=memory_fraction(memory),
    )
