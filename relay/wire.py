"""`relay.deliver_batch` messages written straight to Redis, as Celery would write them.

Ingest's hot path. `celery.send_task` costs a few hundred microseconds of Python per
message (routing, `saferepr` of the arguments, kombu's envelope, one LPUSH each); here a
group's messages are encoded with orjson and pushed, with the counters that go with
them, by one Lua script call. What lands in the `relay` list is a Celery protocol 2
message in kombu's Redis envelope (base64 body, a delivery tag), the same shape
`broker.publish` makes, so `relay worker` consumes it unchanged; tests publish through
here and run the real worker on it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
import uuid
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from relay import keys, status

Item = dict[str, Any]
# Celery's protocol 2 body is [args, kwargs, embed]; a relay task has no links.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Publishing retries briefly (a Redis failover), then fails so the client gets a 503.
RETRIES = 2


class MessageWriter:
    """Encodes item groups as Celery messages of the `relay.deliver_batch` task."""

    def __init__(self) -> None:
        # Ids unique per process by a random prefix, then a counter: a uuid4 per message
        # would cost a system call each. Celery accepts any string as a task id.
        self._prefix = os.urandom(8).hex()
        self._count = 0
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def _next(self) -> str:
        self._count += 1
        return f"{self._prefix}-{self._count:x}"

    def encode(self, items: list[Item], task_id: str | None = None) -> bytes:
        """One message carrying `items` as the task's only argument."""
        task_id = task_id or self._next()
        body = orjson.dumps([[items], {}, _EMBED])
        envelope = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": keys.TASK_DELIVER,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                # Celery logs this; a summary, not a repr of hundreds of events.
                "argsrepr": f"[<{len(items)} events>]",
                "kwargsrepr": "{}",
                "origin": self._origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self._reply_to,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": keys.QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                # kombu keys its unacked hash by this: unique per message.
                "delivery_tag": self._next(),
            },
        }
        return orjson.dumps(envelope)

    def encode_all(
        self, items: list[Item], message_events: int, message_id: str | None = None
    ) -> list[bytes]:
        """`items` split into messages of at most `message_events`, in order.

        With a `message_id`, the ids are `<message_id>.<n>` as `broker.publish` makes them."""
        chunks = range(0, len(items), message_events)
        return [
            self.encode(items[start : start + message_events], f"{message_id}.{n}")
            if message_id
            else self.encode(items[start : start + message_events])
            for n, start in enumerate(chunks)
        ]


# KEYS: the queue, and optionally the ready count and this second's ingest rate.
# ARGV: events, the rate key's ttl, then the messages. One command, so one round trip
# and one reply to parse (a MULTI pipeline of the same writes cost ingest three times
# the CPU), and atomic like MULTI: the counts move with the messages or not at all.
_PUSH = """
for i = 3, #ARGV do redis.call('LPUSH', KEYS[1], ARGV[i]) end
if #KEYS == 3 then
  redis.call('INCRBY', KEYS[2], ARGV[1])
  redis.call('INCRBY', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
"""


class Publisher:
    """Publishes item groups as Celery messages with one script call to Redis.

    On the event loop: handing each group to a publishing thread cost more (the hop, and
    the thread contending for the GIL) than the round trip it kept off the loop."""

    def __init__(
        self, client: aioredis.Redis, message_events: int, *, count_ingested: bool = False
    ) -> None:
        self._push = client.register_script(_PUSH)
        self._max = message_events
        self._count = count_ingested
        self._writer = MessageWriter()

    async def publish(self, items: list[Item], message_id: str | None = None) -> None:
        """Return once `items` are in the `relay` list; raise a RedisError if not.

        With `count_ingested`, the ready count and the ingest rate count them too."""
        messages = self._writer.encode_all(items, self._max, message_id)
        keys_ = [keys.QUEUE]
        if self._count:
            keys_ += [keys.DEPTH_READY, status.rate_key("ingested", time.time())]
        args: list[Any] = [len(items), status.RATE_TTL_S, *messages]
        for attempt in range(RETRIES + 1):
            try:
                # kombu pushes on the left and workers pop on the right: first in, first out.
                await self._push(keys=keys_, args=args)
                return
            except (redis.ConnectionError, redis.TimeoutError):
                # The same bytes again: if the first call did land, the copies carry the
                # same task ids and the workers settle each message once (relay.runs).
                if attempt == RETRIES:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
