"""Sending a batch's commands to ChurnZero: through the shared throttle, in the run's time.

The throttle (relay.delivery.throttle) says whether requests may go now: a short pause is waited
out, a longer one (or one past the run's `send_by`) leaves every chunk unsent; after an
outage a single probe request goes first. The rate limit gives each request a slot, and
chunks beyond the slots stay unsent. The requests then go out together on the thread's
event loop. Each relay id's outcome is the worst of the requests that carried its
commands, or `Unsent` (how long to wait, and why). Events ChurnZero took are marked done
in the run record (relay.delivery.claims) before anything else can fail, so no rerun sends
them again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from relay import retry
from relay.commands import Command
from relay.delivery.churnzero import ChurnZeroClient
from relay.delivery.claims import Claim, Claims
from relay.delivery.problems import Problems
from relay.delivery.settlement import Outcomes, Unsent, worst
from relay.delivery.throttle import ADAPT_MAX_WAIT_S, REPLAY_MAX_WAIT_S, Throttle
from relay.envelope import Envelope
from relay.reasons import Deferral
from relay.settings import Settings
from relay.state import broker

log = structlog.get_logger("relay.delivery")  # one logger for all of a batch's delivery

SHORT_WAIT_S = 2.0  # pauses up to this long are waited out in the task; longer ones deferred
MAX_RATE_WAIT_S = 5.0
# A request whose rate-limit slot is further off than this asks the throttle again when
# the slot comes (a pause may have begun meanwhile); a nearer one goes as a request
# already on the wire would, without a Redis round trip of its own.
RECHECK_AFTER_S = 0.01
# Time kept back from a task's limit for the settlement writes after the last send.
SETTLE_MARGIN_S = 5.0


@dataclass(frozen=True)
class Budget:
    """A run's time, from its start: until when a copy waits for a busy lease, requests
    start, and the run settles."""

    claim_by: float
    send_by: float
    deadline: float

    @classmethod
    def of(cls, settings: Settings, start: float) -> Budget:
        """The budget of a run started at `start` (monotonic seconds)."""
        deadline = start + settings.task_time_limit_s - SETTLE_MARGIN_S
        # A request started by `send_by` is answered or times out before the deadline,
        # so none is cut off on the wire, where ChurnZero may already have taken it.
        send_by = deadline - min(settings.churnzero_timeout_s, (deadline - start) / 2)
        # A copy that waits for another run's lease past `claim_by` gives its message
        # back, to run afresh with the whole budget, rather than claim it with little
        # time left to send.
        claim_by = start + (send_by - start) / 2
        return cls(claim_by, send_by, deadline)


@dataclass
class Chunk:
    """One request's commands, the relay ids they are of, and its outcome."""

    commands: list[Command]
    rids: list[str]
    outcome: retry.Outcome | None = None  # None: not sent (paused, rate-limited, deadline)
    started: bool = False  # on the wire: with no outcome, cut off at the deadline


class RequestReport(Protocol):
    """The part of a message's Report where the sender counts its requests."""

    lane: str  # "live" or "replay": the rate limit's lane
    requests: Counter[str]
    request_seconds: list[float]
    resent: Counter[str]  # events to be sent again though ChurnZero may have them, by cause


def durably(write: Callable[[], None], budget: Budget) -> None:
    """Run a Redis write, retrying through a blip until the task's time is up."""
    pause = 0.1
    while True:
        try:
            write()
            return
        except broker.QUEUE_ERRORS:
            if time.monotonic() + pause > budget.deadline + SETTLE_MARGIN_S - 1:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


class Sender:
    """Sends chunks for one thread: it owns the event loop the requests run on."""

    def __init__(
        self,
        settings: Settings,
        r: Any,
        claims: Claims,
        throttle: Throttle,
        client: ChurnZeroClient,
    ) -> None:
        self.settings = settings
        self.redis = r
        self.claims = claims
        self.throttle = throttle
        self.client = client
        self.problems = Problems(r, client)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        """Close the connection pool and the loop."""
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def send(
        self, chunks: list[Chunk], report: RequestReport, claim: Claim, budget: Budget
    ) -> Outcomes:
        """Send what the throttle allows before the deadline; every relay id's outcome."""
        unsent_wait, cause = self._send_chunks(chunks, report, claim, budget)
        outcomes = outcomes_of(chunks, Unsent(unsent_wait, cause))
        report.resent.update(unknown_fate(chunks, outcomes))
        return outcomes

    def _after_send(
        self, chunks: list[Chunk], sent: list[Chunk], claim: Claim, budget: Budget
    ) -> float:
        """Mark delivered events done first (nothing may fail in between), then tell the
        shared throttle; returns the pause now in force."""
        self._mark_delivered(chunks, claim, budget)
        try:
            return self._report_throttle(sent)
        except broker.QUEUE_ERRORS:
            return 0.0  # Redis is away: no shared pause to tell, nor to obey

    def _mark_delivered(self, chunks: list[Chunk], claim: Claim, budget: Budget) -> None:
        """Mark done every event whose requests all got a 2xx, through a Redis blip."""
        done = [
            rid for rid, o in outcomes_of(chunks, Unsent(0.0)).items()
            if rid not in claim.done and isinstance(o, retry.Outcome)
            and o.kind is retry.Kind.SUCCESS
        ]  # fmt: skip
        durably(lambda: self.claims.mark_done(claim, done), budget)

    def _send_chunks(
        self, chunks: list[Chunk], report: RequestReport, claim: Claim, budget: Budget
    ) -> tuple[float, str]:
        """Send; returns how long unsent chunks should wait, and why they were not sent."""
        permit = self.throttle.permit()
        for _ in range(3):
            if permit.go or permit.wait_s > SHORT_WAIT_S:
                break
            if time.monotonic() + permit.wait_s > budget.send_by:
                return permit.wait_s, Deferral.DEADLINE
            time.sleep(permit.wait_s)
            permit = self.throttle.permit()
        if not permit.go:
            # Every chunk stays unsent, deferred past the pause.
            return permit.wait_s, Deferral.PAUSED
        todo = chunks
        if permit.probe:
            # One request tests whether ChurnZero is back before anyone sends more.
            if time.monotonic() > budget.send_by:
                return 0.0, Deferral.DEADLINE
            self._run([self._send_one(chunks[0], 0.0, report, check=False)], chunks, claim, budget)
            first = chunks[0].outcome
            ok = first is not None and first.kind is not retry.Kind.RETRYABLE
            pause = self._after_send(chunks, [chunks[0]], claim, budget)
            if not ok:
                return pause, Deferral.PAUSED
            todo = chunks[1:]
        if not todo:
            return 0.0, Deferral.PAUSED
        replay = report.lane == "replay"
        learning = self.settings.adaptive_rate and not self.settings.rate_limit_rps
        horizon = ADAPT_MAX_WAIT_S if learning else MAX_RATE_WAIT_S
        delays = self.throttle.reserve(
            len(todo), min(REPLAY_MAX_WAIT_S, horizon) if replay else horizon, report.lane
        )
        if isinstance(delays, float):
            return delays, Deferral.REPLAY_SHARE if replay else Deferral.PAUSED
        # Chunks beyond the reserved slots stay unsent and come back after the last slot.
        rate_wait = delays[-1] if len(delays) < len(todo) else 0.0
        todo = todo[: len(delays)]

        sends = [
            self._send_one(c, d, report, check=d > RECHECK_AFTER_S, send_by=budget.send_by)
            for c, d in zip(todo, delays, strict=True)
        ]
        in_time = self._run(sends, chunks, claim, budget)
        late = time.monotonic() > budget.send_by and any(c.outcome is None for c in todo)
        pause = max(self._after_send(chunks, todo, claim, budget), rate_wait)
        return pause, Deferral.DEADLINE if late or not in_time else Deferral.PAUSED

    def _run(
        self, sends: list[Coroutine[Any, Any, None]], chunks: list[Chunk], claim: Claim,
        budget: Budget,
    ) -> bool:  # fmt: skip
        """Run sends on this thread's loop until all are done or the deadline; whether in
        time. Every send has ended when this returns, whatever happened.

        Requests start only until `send_by`, so each ends (answered or timed out) before
        the deadline. One still on the wire then (a stalled client) is cancelled and
        counts as unsent: ChurnZero may have had it, so its events may arrive twice.
        If a send fails, its siblings are cancelled and awaited (none may send during a
        later message's run, where no run would mark it), and the events ChurnZero took
        meanwhile are marked done before the error goes on: a rerun never sends them again.
        """
        remaining = max(budget.deadline - time.monotonic(), 0.1)
        try:
            self.loop.run_until_complete(_all_or_none(sends, remaining))
        except TimeoutError:
            return False
        except BaseException:
            self._mark_delivered(chunks, claim, budget)
            raise
        return True

    async def _send_one(
        self, chunk: Chunk, delay: float, report: RequestReport, *, check: bool,
        send_by: float | None = None,
    ) -> None:  # fmt: skip
        if delay > 0:
            await asyncio.sleep(delay)
        if send_by is not None and time.monotonic() > send_by:
            return  # too late to start: it could not end before the task's deadline
        if check and not self._may_go():
            return  # a pause began while this request waited for its slot
        started = time.perf_counter()
        chunk.started = True
        chunk.outcome = await self.client.send(chunk.commands)
        report.request_seconds.append(time.perf_counter() - started)
        report.requests[chunk.outcome.label] += 1
        self.problems.seen(chunk.outcome)

    def _may_go(self) -> bool:
        try:
            return self.throttle.permit().go
        except broker.QUEUE_ERRORS:
            # Redis is away: whether a pause began is unknown, so this chunk waits, unsent,
            # and its siblings on the wire go on to be marked as ChurnZero answers them.
            return False

    def _report_throttle(self, chunks: list[Chunk]) -> float:
        sent = [c.outcome for c in chunks if c.outcome is not None]
        if not sent:
            return self.throttle.permit().wait_s
        failures = [o for o in sent if o.kind is retry.Kind.RETRYABLE]
        waits = [o.retry_after_s for o in failures if o.retry_after_s is not None]
        # A 429 without Retry-After still means "slow down": hold everyone back a second
        # (with the self-tuning rate on, a cut of the learned rate instead:
        # relay.delivery.throttle).
        if any(o.status == 429 for o in failures) and not waits:
            waits = [1.0]
        cap = self.settings.retry_after_cap_s
        return self.throttle.report(
            successes=len(sent) - len(failures),
            failures=len([o for o in failures if o.status != 429]),
            retry_after_s=retry.clamp_retry_after(max(waits), cap) if waits else None,
            throttled=len([o for o in failures if o.status == 429]),
        )


OK = retry.Outcome(status=200)


async def _all_or_none(sends: list[Coroutine[Any, Any, None]], timeout_s: float) -> None:
    """Run the sends together for at most `timeout_s`; on an error or the timeout the
    others are cancelled and awaited, so none outlives this call."""
    tasks = [asyncio.ensure_future(send) for send in sends]
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def outcomes_of(chunks: list[Chunk], unsent: Unsent) -> Outcomes:
    """Each relay id's outcome: the worst of the requests that carried its commands."""
    outcomes: Outcomes = {}
    for chunk in chunks:
        outcome: retry.Outcome | Unsent = chunk.outcome if chunk.outcome is not None else unsent
        if isinstance(outcome, retry.Outcome) and outcome.kind is retry.Kind.SUCCESS:
            # A success is never worse than what an event has: `worst` keeps that, or OK.
            for rid in chunk.rids:
                outcomes.setdefault(rid, OK)
            continue
        for rid in chunk.rids:
            outcomes[rid] = worst(outcomes.get(rid, OK), outcome)
    return outcomes


def unknown_fate(chunks: list[Chunk], outcomes: Outcomes) -> Counter[str]:
    """Events to be tried again though ChurnZero may have taken a request of theirs, by
    cause: no answer before the client's timeout (`timeout`), the connection lost once
    the request went (`connection_error`), or cut off on the wire at the task's deadline
    (`deadline`). Each may arrive twice."""
    causes: dict[str, str] = {}
    for chunk in chunks:
        if chunk.outcome is None:
            cause = Deferral.DEADLINE if chunk.started else ""
        else:
            cause = chunk.outcome.error or "" if chunk.outcome.status is None else ""
        for rid in chunk.rids if cause else ():
            causes.setdefault(rid, cause)
    return Counter(
        str(cause) for rid, cause in causes.items()
        if not (isinstance(o := outcomes[rid], retry.Outcome) and o.kind is retry.Kind.PERMANENT)
    )  # fmt: skip


def chunked(send: list[tuple[Envelope, list[Command]]], size: int) -> list[Chunk]:
    """The events' commands in requests of at most `size`, each event's together when
    they fit (one with more than `size` commands gets requests of its own)."""
    chunks: list[Chunk] = []
    current = Chunk([], [])
    for item, commands in send:
        if current.commands and len(current.commands) + len(commands) > size:
            chunks.append(current)
            current = Chunk([], [])
        if len(commands) > size:  # one event with many traits: several requests of its own
            for start in range(0, len(commands), size):
                chunks.append(Chunk(commands[start : start + size], [item.id]))
            continue
        current.commands.extend(commands)
        current.rids.append(item.id)
    if current.commands:
        chunks.append(current)
    return chunks
