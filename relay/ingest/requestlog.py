"""Ingest's canonical log lines: one per request, or one per second for the good ones.

At thousands of requests a second a line per request costs ingest more than some of
its real work. `RELAY_INGEST_LOG=aggregate` (the default) writes one `ingest_summary`
line a second for the requests answered 2xx with nothing rejected, and still writes
every error, every non-2xx and every request with rejected events in full, as the
`ingest` line `RELAY_INGEST_LOG=each` writes for every request.

A 401 or 403 is a WARNING: Segment drops what is refused, so a mistyped secret loses
every event. Those lines say which check failed and are written once per
`REFUSED_EVERY_S` per route and check, with the count of those left out since.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog

from relay.logs import Every

log = structlog.get_logger("relay.ingest")

SUMMARY_INTERVAL_S = 1.0
REFUSED_EVERY_S = 10.0


class RequestLog:
    """Writes ingest's request lines, in full or summed per interval."""

    def __init__(self, aggregate: bool) -> None:
        self.aggregate = aggregate
        self._refused = Every(REFUSED_EVERY_S)
        self._reset()

    def _reset(self) -> None:
        self._requests: dict[str, int] = {}
        self._events = 0
        self._ms_total = 0.0
        self._ms_max = 0.0

    def record(self, status: int, ms: float, outcome: dict[str, Any]) -> None:
        """One answered request; `outcome` holds its route and what became of it."""
        if status in (401, 403):
            self.refused(status, ms, outcome)
            return
        if not self.aggregate or status >= 300 or "error" in outcome or outcome.get("rejected"):
            log.info("ingest", status=status, ms=round(ms, 2), **outcome)
            return
        route = outcome["route"]
        self._requests[route] = self._requests.get(route, 0) + 1
        self._events += outcome.get("accepted", 0)
        self._ms_total += ms
        self._ms_max = max(self._ms_max, ms)

    def refused(self, status: int, ms: float, outcome: dict[str, Any]) -> None:
        """A request refused for its credentials or origin: a WARNING, rate-limited."""
        key = f"{outcome.get('route')}:{status}:{outcome.get('check', '')}"
        if self._refused.due(key):
            suppressed = self._refused.suppressed(key)
            log.warning("ingest", status=status, ms=round(ms, 2), suppressed=suppressed,
                        **outcome)  # fmt: skip

    def flush(self) -> None:
        """Write the summary of the requests since the last one (nothing if none)."""
        if not self._requests:
            return
        count = sum(self._requests.values())
        log.info(
            "ingest_summary",
            status=200,
            requests=count,
            by_route=self._requests,
            accepted=self._events,
            ms_mean=round(self._ms_total / count, 2),
            ms_max=round(self._ms_max, 2),
            interval_s=SUMMARY_INTERVAL_S,
        )
        self._reset()

    async def summaries(self, _app: object) -> AsyncIterator[None]:
        """cleanup_ctx: flush the summary every interval, and a last time at shutdown."""

        async def every_interval() -> None:
            while True:
                await asyncio.sleep(SUMMARY_INTERVAL_S)
                self.flush()

        task = asyncio.create_task(every_interval())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.flush()
