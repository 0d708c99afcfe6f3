"""The delayed set: batches waiting for their next try (retry backoff, pauses, identity
waits), kept in Redis rather than as Celery ETA tasks.

A Celery ETA past the visibility timeout is delivered twice, and ETA tasks sit in worker
memory. Here a ZSET holds them by due time; a mover in every worker moves due batches
back to the queue. Moving is claim, publish, remove: a claim pushes the member's due
time forward by a lease, so a mover that dies mid-way loses nothing (the batch comes
due again after the lease; at worst it is published twice).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson

from relay import keys

Item = dict[str, Any]
LEASE_S = 60

# KEYS: delayed. ARGV: now, limit, lease. Claims up to `limit` due members.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), member)
end
return due
"""


def stage_schedule(pipe: Any, items: list[Item], due: float) -> None:
    """Queue on a pipeline: these items come back to the queue at `due` (unix time)."""
    if not items:
        return
    member = orjson.dumps({"id": uuid.uuid4().hex, "items": items})
    pipe.zadd(keys.DELAYED, {member: due})
    pipe.incrby(keys.DELAYED_EVENTS, len(items))


class Mover:
    """Moves due batches from the delayed set back to the Celery queue."""

    def __init__(self, r: Any, publish: Callable[[list[Item]], None], page: int = 200) -> None:
        self._redis = r
        self._publish = publish
        self._page = page
        self._claim = r.register_script(_CLAIM)

    def move_due(self, now: float) -> int:
        """Move what is due; returns the number of events moved."""
        members = self._claim(keys=[keys.DELAYED], args=[now, self._page, LEASE_S])
        moved = 0
        for member in members:
            items = orjson.loads(member)["items"]
            self._publish(items)
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(keys.DELAYED, member)
            pipe.decrby(keys.DELAYED_EVENTS, len(items))
            pipe.incrby(keys.DEPTH_READY, len(items))
            pipe.execute()
            moved += len(items)
        return moved

    def next_due(self) -> float | None:
        """When the next batch comes due (unix time), or None if the set is empty."""
        first = self._redis.zrange(keys.DELAYED, 0, 0, withscores=True)
        return float(first[0][1]) if first else None
