"""Ingest's admission check: whether to accept new events, known before a request arrives.

Ingest refuses work (503, which Segment retries) while Redis does not answer, the backlog
is over its high-water mark or Redis's memory is over its threshold. The check is refreshed
in the background, so a request reads a flag instead of waiting on Redis.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from relay import keys
from relay.state import status

# Redis bytes per byte of decoded request body, at most: a queued event is its JSON,
# zlib-compressed and base64-encoded inside kombu's frame (about 1.4 for JSON that
# does not compress, far less for real batches); 2 leaves margin.
REDIS_BYTES_PER_BODY_BYTE = 2


class Admission:
    """Whether ingest may accept: Redis answers, the backlog is under the high-water mark
    and Redis's memory under its threshold. Refreshed in the background so requests never
    wait on the check."""

    def __init__(self, limit: int, max_memory_fraction: float = 1.0) -> None:
        self.limit = limit
        self.max_memory_fraction = max_memory_fraction
        self.waiting = 0
        self.used_memory = 0
        self.maxmemory = 0  # 0: unlimited, only the queue depth applies
        self.redis_ok = True
        self.reason = ""
        # Bytes this process queued since the last reading: between two readings a burst
        # could otherwise run past the threshold, up to maxmemory.
        self._queued_bytes = 0

    def queued(self, body_bytes: int) -> None:
        """Count a request body queued since the last reading."""
        self._queued_bytes += body_bytes * REDIS_BYTES_PER_BODY_BYTE
        if self.maxmemory and self.memory_fraction >= self.max_memory_fraction:
            self.reason = self._memory_reason()

    @property
    def memory_fraction(self) -> float:
        """Redis used_memory (plus what was queued since) / maxmemory; 0 when unlimited."""
        if not self.maxmemory:
            return 0.0
        return (self.used_memory + self._queued_bytes) / self.maxmemory

    @property
    def open(self) -> bool:
        """Accepting new events."""
        return (
            self.redis_ok
            and self.waiting <= self.limit
            and self.memory_fraction < self.max_memory_fraction
        )

    async def refresh(self, r: aioredis.Redis) -> None:
        """Read the backlog and Redis's memory once."""
        try:
            pipe = r.pipeline(transaction=False)
            pipe.get(keys.DEPTH_READY)
            pipe.get(keys.DELAYED_EVENTS)
            pipe.llen(keys.QUEUE)
            pipe.llen(keys.REPLAY_QUEUE)
            pipe.info("memory")
            counted = self._queued_bytes
            ready, delayed, live, replay, memory = await pipe.execute()
            self.waiting = status.backlog(ready, delayed, int(live) + int(replay))
            self.used_memory = int(memory.get("used_memory", 0))
            self.maxmemory = int(memory.get("maxmemory", 0))
            self._queued_bytes -= counted  # now inside used_memory
            self.redis_ok = True
        except (redis.RedisError, OSError) as exc:
            self.redis_ok = False
            self.reason = type(exc).__name__
        if not self.redis_ok:
            self.reason = "redis unreachable"
        elif self.memory_fraction >= self.max_memory_fraction:
            self.reason = self._memory_reason()
        elif self.waiting > self.limit:
            self.reason = f"queue over its high-water mark ({self.waiting} > {self.limit})"

    def _memory_reason(self) -> str:
        # Refused well before maxmemory: with noeviction a full Redis refuses every write,
        # and the workers need the headroom to drain it (docs/operations.md, runbook "Redis full").
        return (
            f"redis memory at {self.memory_fraction:.0%} of maxmemory "
            f"(threshold {self.max_memory_fraction:.0%})"
        )
