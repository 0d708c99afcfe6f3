"""A Python load generator for the benchmarks that need more than wrk: bodies built per
request, counted answers, pacing, and the sandbox's view of what arrived."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.bench.harness import http_json
from tests.bench.payloads import basic_auth

RETRYABLE = {408, 429, 500, 502, 503, 504}


@dataclass
class Sent:
    """What the load generator saw."""

    started: float = 0.0
    finished: float = 0.0
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "retries": self.retries,
            "seconds": round(self.finished - self.started, 3),
        }


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, sent: Sent, headers: dict[str, str]
) -> None:
    # Retry what a Segment library retries, a few times, so no event is silently lost.
    for attempt in range(5):
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                sent.statuses[response.status] += 1
                if response.status not in RETRYABLE:
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.errors[type(exc).__name__] += 1
        sent.retries += 1
        await asyncio.sleep(0.05 * 2**attempt)


def _session(concurrency: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=30),
        headers={"Content-Type": "application/json", "Authorization": basic_auth()},
    )


async def _blast(url: str, bodies: Iterable[bytes], concurrency: int) -> Sent:
    sent = Sent()
    todo = iter(bodies)

    async def run(session: aiohttp.ClientSession) -> None:
        for body in todo:
            sent.requests += 1
            await _post(session, url, body, sent, {})

    async with _session(concurrency) as session:
        sent.started = time.time()
        await asyncio.gather(*(run(session) for _ in range(concurrency)))
        sent.finished = time.time()
    return sent


def blast(url: str, bodies: Iterable[bytes], concurrency: int) -> Sent:
    """POST every body, `concurrency` at a time, as fast as the server answers."""
    return asyncio.run(_blast(url, bodies, concurrency))


async def _paced(
    url: str, make_body: Callable[[], bytes], per_s: float, seconds: float, max_in_flight: int
) -> Sent:
    sent = Sent()
    total = max(int(per_s * seconds), 1)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession, body: bytes) -> None:
        try:
            await _post(session, url, body, sent, {})
        finally:
            slots.release()

    async with _session(max_in_flight) as session:
        sent.started = start = time.time()
        for i in range(total):
            delay = start + i / per_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            sent.requests += 1
            # The body is built now, so the send time it carries is the real one.
            task = asyncio.create_task(one(session, make_body()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        sent.finished = time.time()
    return sent


def paced(
    url: str,
    make_body: Callable[[], bytes],
    per_s: float,
    seconds: float,
    max_in_flight: int = 64,
) -> Sent:
    """POST `per_s` requests per second for `seconds`, each body built at its send time."""
    return asyncio.run(_paced(url, make_body, per_s, seconds, max_in_flight))


class SandboxView:
    """The ChurnZero sandbox, seen over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def faults(self, **faults: Any) -> None:
        http_json("POST", self.url + "/_sandbox/faults", faults)

    def clear(self) -> None:
        """Forget commands, the request log and stats (faults stay)."""
        http_json("DELETE", self.url + "/_sandbox/commands")

    def stats(self) -> dict[str, Any]:
        return dict(http_json("GET", self.url + "/_sandbox/stats"))

    def requests_log(self) -> list[dict[str, Any]]:
        return list(http_json("GET", self.url + "/_sandbox/requests", timeout=120))

    def commands(self) -> list[dict[str, Any]]:
        return list(http_json("GET", self.url + "/_sandbox/commands", timeout=120))

    def wait_commands(
        self,
        count: int,
        *,
        timeout: float,
        stall: float = 20.0,
        alive: Callable[[], None] | None = None,
    ) -> int:
        """Wait until `count` commands were accepted, or none came for `stall` seconds, or
        `timeout` passed; return how many were accepted."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            got = int(self.stats()["commands"])
            now = time.monotonic()
            if got >= count or now > deadline:
                return got
            if got != last:
                last, last_change = got, now
            elif now - last_change > stall:
                return got
            if alive is not None:
                alive()
            time.sleep(0.2)
