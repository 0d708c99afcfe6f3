"""Group commit: events from concurrent ingest requests published as few Celery messages.

A request hands its events to `GroupCommit.submit` and waits. The first events start a
short timer (`flush_ms`); when it fires, or `message_events` are waiting, everything
waiting is published by `ConfirmedPublisher` on the event loop. While one publish is under
way the next group gathers, so batches grow with load. A request's future resolves only
after the message holding its events is in Redis and, with `RELAY_REDIS_WAIT_REPLICAS`,
after WAIT confirms that many replicas hold it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import redis

from relay.envelope import Json
from relay.state import broker


class ConfirmedPublisher:
    """Writes a group's messages and their counts with one Redis script call
    (`broker.AsyncQueue`), then, with `wait_replicas`, waits for WAIT to confirm them."""

    def __init__(
        self,
        queue: broker.AsyncQueue,
        acker: redis.Redis,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        # `acker` is its own client, never retrying: a retry could land on a newly promoted
        # primary and have WAIT confirm writes that died with the old one.
        self._queue = queue
        self._acker = acker
        self._replicas = wait_replicas
        self._timeout_ms = wait_timeout_ms

    async def publish(self, items: list[Json]) -> None:
        """Return once `items` are queued (and replicated, if asked); raise if not."""
        await self._queue.publish(items)
        if self._replicas:
            await asyncio.to_thread(
                broker.confirm_replicated, self._acker, self._replicas, self._timeout_ms
            )


class GroupCommit:
    """Collects items from many requests and publishes them in batches."""

    def __init__(
        self,
        publish: Callable[[list[Json]], Coroutine[Any, Any, None]],
        *,
        flush_ms: float,
        message_events: int,
    ) -> None:
        self._publish = publish
        self._delay = flush_ms / 1000
        self._max = message_events
        self._items: list[Json] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._under_way: asyncio.Task[None] | None = None

    async def submit(self, items: list[Json]) -> None:
        """Return once `items` are durably queued; raise if publishing failed."""
        if not items:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._items.extend(items)
        self._waiters.append(waiter)
        if len(self._items) >= self._max:
            self._flush()
        elif self._timer is None and self._under_way is None:
            self._timer = loop.call_later(self._delay, self._flush)
        await waiter

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._under_way is not None or not self._items:
            return  # the publish under way flushes again when it ends
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.get_running_loop().create_task(self._publish(items))
        self._under_way = task
        task.add_done_callback(lambda f: self._done(f, waiters))

    def _done(self, future: asyncio.Future[None], waiters: list[asyncio.Future[None]]) -> None:
        self._under_way = None
        error = None if future.cancelled() else future.exception()
        for waiter in waiters:
            if waiter.done():  # the request went away; its events are queued regardless
                continue
            if future.cancelled():
                waiter.cancel()
            elif error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        if self._items:
            self._flush()

    async def close(self) -> None:
        """Wait for the publish under way, if any (its outcome went to its requests)."""
        if self._under_way is not None:
            await asyncio.wait([self._under_way])
