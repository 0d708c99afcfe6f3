"""Group commit: events from concurrent ingest requests published as few Celery messages.

A request hands its events to `GroupCommit.submit` and waits. The first events start a
short timer (`flush_ms`); when it fires, or `message_events` are waiting, everything
waiting is published as `relay.deliver_batch` messages in a background thread (Celery's
publishing is blocking; the event loop never waits on it). While one publish is under
way the next group gathers, so batches grow with load. A request's future resolves only
after the message holding its events is in Redis and, with `RELAY_REDIS_WAIT_REPLICAS`,
after WAIT confirms that many replicas hold it too. Ingest passes `publish`,
`broker.AsyncQueue`'s writer of the same messages, which runs on the event loop instead
of the thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from relay.envelope import Json
from relay.state import broker

# Publishing is not tried again, so that the client gets a 503 within about a second
# (relay.state.redis_conn): kombu's retry cannot tell a refused connection from one that timed
# out, and trying again would add a connect timeout to every answer while connects time out.
RETRY_POLICY = {"max_retries": 0, "interval_start": 0.0, "interval_step": 0.0, "interval_max": 0.0}


class GroupCommit:
    """Collects items from many requests and publishes them in batches."""

    def __init__(
        self,
        celery: Celery,
        *,
        flush_ms: float,
        message_events: int,
        after_publish: Callable[[int], None] | None = None,
        publish: Callable[[list[Json]], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        # `publish`, when given, replaces Celery's send_task in the thread (and
        # `after_publish`): broker.AsyncQueue's writer, run on the event loop.
        self._send = publish
        self._celery = celery
        self._delay = flush_ms / 1000
        self._max = message_events
        self._after_publish = after_publish
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-publish")
        self._items: list[Json] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

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
        elif self._timer is None and not self._busy:
            self._timer = loop.call_later(self._delay, self._flush)
        await waiter

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._items:
            return  # the publish under way flushes again when it ends
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        self._busy = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = (
            loop.create_task(self._send(items))
            if self._send is not None
            else loop.run_in_executor(self._executor, self._publish, items)
        )
        future.add_done_callback(lambda f: self._done(f, waiters))

    def _publish(self, items: list[Json]) -> None:
        broker.send(self._celery, items, retry_policy=RETRY_POLICY)
        if self._after_publish is not None:
            self._after_publish(len(items))

    def _done(self, future: asyncio.Future[None], waiters: list[asyncio.Future[None]]) -> None:
        self._busy = False
        error = future.exception()
        for waiter in waiters:
            if waiter.done():  # the request went away; its events are queued regardless
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        if self._items:
            self._flush()

    def close(self) -> None:
        """Wait for the publish under way and stop the publishing thread."""
        self._executor.shutdown(wait=True)
