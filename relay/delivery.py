"""Delivering one batch of queued items to ChurnZero: the worker's whole job.

`Delivery.deliver(items, message_id)` claims the message (see relay.runs: a message
that runs twice is settled once), parses, drops duplicates, resolves identities,
translates, sends (through the shared throttle, within the task's time limit) and then
settles every item exactly once (relay.settlement decides; this module does the I/O):
delivered, skipped (with a counted reason), put in the delayed set for a later try, or
dead-lettered. Celery is not involved here; the task only calls this.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from relay import (
    broker,
    deadletter,
    delayed,
    freshness,
    identity,
    keys,
    names,
    oom,
    retry,
    status,
    trace,
)
from relay.churnzero import ChurnZeroClient
from relay.dedupe import Dedupe
from relay.mapping import Mapping
from relay.reasons import Reason
from relay.resolution import resolve_raw_key
from relay.runs import Claim, Runs, State
from relay.settings import VISIBILITY_MARGIN_S, Settings
from relay.settlement import Outcomes, Policy, Unsent, group_later, settle, worst
from relay.throttle import ADAPT_MAX_WAIT_S, REPLAY_MAX_WAIT_S, Throttle
from relay.translate import Command, lookup_keys, parse_items, plan_batch, tombstone_keys

log = structlog.get_logger("relay.delivery")
Item = dict[str, Any]
SHORT_WAIT_S = 2.0  # pauses up to this long are waited out in the task; longer ones deferred
MAX_RATE_WAIT_S = 5.0
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


class MessageBusy(Exception):
    """Another run of this message still holds its lease; give the message back."""


@dataclass
class Report:
    """What became of a batch, for the canonical log line and the counters."""

    received: int = 0
    delivered: int = 0
    lane: str = "live"  # or "replay": every event of the message is a replayed dead letter
    already_settled: bool = False
    skipped: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    attributes: Counter[str] = field(default_factory=Counter)  # writes not sent, by reason
    requests: Counter[str] = field(default_factory=Counter)
    request_seconds: list[float] = field(default_factory=list)

    def as_log(self) -> dict[str, Any]:
        """Flat fields for a log line."""
        return {
            "received": self.received,
            "delivered": self.delivered,
            "already_settled": self.already_settled,
            "skipped": dict(self.skipped),
            "dead": dict(self.dead),
            "retried": dict(self.retried),
            "attributes_skipped": dict(self.attributes),
            "requests": dict(self.requests),
        }


@dataclass
class _Chunk:
    commands: list[Command]
    rids: list[str]
    outcome: retry.Outcome | None = None  # None: not sent (paused, rate-limited, deadline)


class Delivery:
    """Delivers batches for one thread (it owns an event loop and a connection pool)."""

    def __init__(self, settings: Settings, r: Any, mapping: Mapping) -> None:
        self.settings = settings
        self.redis = r
        self.mapping = mapping
        self.policy = Policy.of(settings)
        self.dedupe = Dedupe(r, settings.dedupe_window_s)
        self.runs = Runs(
            r,
            lease_s=settings.task_time_limit_s + VISIBILITY_MARGIN_S,
            ttl_s=settings.run_record_ttl_s,
        )
        self.names = names.Names(r, max_per_kind=settings.names_max)
        self.throttle = Throttle(
            r, rate_limit_rps=settings.rate_limit_rps, outage_threshold=settings.outage_threshold,
            replay_share=settings.replay_share, adaptive=settings.adaptive_rate,
        )  # fmt: skip
        key, eiv = settings.churnzero_app_key, settings.churnzero_eiv_secret
        self.client = ChurnZeroClient(
            settings.churnzero_url,
            key.get_secret_value() if key else "",
            timeout_s=settings.churnzero_timeout_s,
            misconfigured_pause_s=settings.churnzero_misconfigured_pause_s,
            eiv_secret=eiv.get_secret_value() if eiv else None,
        )
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        """Close the connection pool and the loop."""
        self.loop.run_until_complete(self.client.close())
        self.loop.close()

    def deliver(self, items: list[Item], message_id: str) -> Report:
        """Settle every item of the message once, however often it runs; see the module
        docstring. Raises MessageBusy when another run holds it past this run's time."""
        budget = Budget.of(self.settings, time.monotonic())
        claim = self._claim(message_id, len(items), budget)
        if claim.state is State.SETTLED:
            return Report(received=len(items), already_settled=True)
        try:
            try:
                return self._deliver(items, claim, budget)
            except broker.QUEUE_ERRORS:
                raise
            except Exception as exc:
                # A malformed message or a bug. Celery would drop the message: keep its
                # events as dead letters instead, with the error.
                log.exception("batch_failed", events=len(items))
                return self._dead_letter_all(items, claim, exc)
        except BaseException:
            # Unsettled: the message runs again (Redis hands it out again), and the
            # events marked done are not sent twice.
            with contextlib.suppress(Exception):  # Redis is away: the lease expires anyway
                self.runs.release(claim)
            raise

    def _dead_letter_all(self, items: list[Any], claim: Claim, exc: Exception) -> Report:
        error = f"{type(exc).__name__}: {exc}"[:500]
        report = Report(received=len(items))
        dead = []
        for item in items:
            if isinstance(item, dict) and item.get("id") in claim.done:
                report.delivered += 1
                continue
            wrapped = item if isinstance(item, dict) else {"event": item}
            try:
                orjson.dumps(wrapped)
            except (TypeError, orjson.JSONEncodeError):
                wrapped = {"event": repr(item)[:32_000]}  # kept, if only as text
            dead.append(deadletter.new_entry(wrapped, Reason.WORKER_ERROR, errors=[error]))
        report.dead[Reason.WORKER_ERROR.value] = len(dead)
        pipe = self.redis.pipeline(transaction=True)
        deadletter.stage_add(pipe, dead)
        _stage_stats(pipe, report, time.time())
        self.runs.stage_settled(pipe, claim, len(items))
        oom.execute(self.redis, pipe)
        return report

    def _claim(self, message_id: str, events: int, budget: Budget) -> Claim:
        while True:
            claim = self.runs.claim(message_id, events)
            if claim.state is not State.BUSY:
                return claim
            # Another run (a copy kombu restored while the first still runs) holds the
            # lease: wait for it to settle, or give the message back if it takes long,
            # rather than claim it with too little time left to send.
            now = time.monotonic()
            if now >= budget.claim_by:
                raise MessageBusy(message_id)
            time.sleep(min(max(claim.busy_for_s, 0.05), 1.0, budget.claim_by - now))

    def _deliver(self, items: list[Item], claim: Claim, budget: Budget) -> Report:
        now = time.time()
        report = Report(received=len(items), lane=lane_of(items))
        parsed, bad = parse_items(items)
        dead = [deadletter.new_entry(i, Reason.INVALID_EVENT, errors=e, now=now) for i, e in bad]
        dups = self.dedupe.duplicates([item for item, _ in parsed])
        report.skipped["duplicate"] += len(dups)
        skipped = [(item, "duplicate") for item, _ in parsed if item["id"] in dups]
        parsed = [(item, event) for item, event in parsed if item["id"] not in dups]
        found = identity.lookup(
            self.redis, lookup_keys(parsed, self.mapping), tombstone_keys(parsed)
        )
        plan = plan_batch(parsed, found.known, self.mapping, found.links, found.deleted)
        held = names.guard(self.redis, plan, self.settings.new_names, claim.done)
        if self.settings.attribute_clock_ttl_s:
            clock_s = self.settings.attribute_clock_ttl_s
            stamps = freshness.stamps(parsed)
            if stale := freshness.reserve(self.redis, plan, stamps, clock_s, claim.done):
                report.attributes["stale_attribute"] += stale

        # An earlier run of this message got a 2xx for some events: never send them again.
        outcomes: Outcomes = {rid: _OK for rid in claim.done}
        todo = [(item, commands) for item, commands in plan.send if item["id"] not in claim.done]
        chunks = _chunk(todo, self.settings.churnzero_batch_size)
        if chunks:
            outcomes |= self._send(chunks, report, claim, budget)
        settled = settle(plan, outcomes, now, self.policy)

        report.delivered = len(settled.delivered)
        delivered = {item["id"] for item in settled.delivered}
        report.skipped.update(settled.skipped)
        dead += settled.dead
        later = group_later(settled.later)
        for batch, _, cause in later:
            report.retried[cause] += len(batch)
        for entry in dead:
            report.dead[entry.reason.value] += 1

        def write(pipe: Any) -> None:
            ttl_s = self.settings.identity_ttl_s
            # A delete outlives every event received before it: their maximum age.
            tombstone_s = int(self.settings.max_age_s + self.settings.identity_wait_s) + 3600
            identity.stage_forget(pipe, plan.forgotten, tombstone_s)
            identity.stage_store(pipe, plan.learned, ttl_s)
            identity.stage_links(pipe, plan.links, ttl_s)
            # After the lessons, in the same MULTI: released tracks find them. Before this
            # batch's own waits, which were planned knowing these lessons already.
            identity.stage_release(pipe, plan.released)
            for batch, due, cause in later:
                member = delayed.stage_schedule(pipe, batch, due, cause)
                if cause == "identity_wait" and member is not None:
                    users = [resolve_raw_key(item.get("event")) for item in batch]
                    wait_s = self.settings.identity_wait_s + delayed.LEASE_S
                    identity.stage_waiting(pipe, member, filter(None, users), wait_s)
            deadletter.stage_add(pipe, dead)
            _stage_stats(pipe, report, now)
            sent = [(item, cmds) for item, cmds in plan.send if item["id"] in delivered]
            self.names.stage_learn(pipe, names.sent_names(sent))
            self.names.stage_held(pipe, held)
            trace.stage_record(
                pipe, self.settings.trace_size, delivered=sent,
                skipped=skipped + plan.skipped, dead=dead,
            )  # fmt: skip

        # Past the sends, what ChurnZero accepted is known only here: hold on to it
        # through a Redis blip rather than give the message back to be sent again.
        self._durably(lambda: self._settle_once(claim, len(items), write), budget)
        with contextlib.suppress(*broker.QUEUE_ERRORS):  # an unreleased claim only expires
            self.dedupe.release([e.item for e in dead])
        if plan.forgotten:
            # Not in the MULTI (a scan); an error gives the message back, and the
            # delete is settled already, so it is logged for the operator instead.
            try:
                removed = deadletter.remove_users(self.redis, set(plan.forgotten))
                log.info("users_deleted", users=len(plan.forgotten), dead_letters=removed)
            except broker.QUEUE_ERRORS:
                log.error("users_deleted_dead_letters_kept", users=sorted(plan.forgotten))
        return report

    def _settle_once(self, claim: Claim, events: int, write: Any) -> None:
        # A MULTI whose answer was lost may have been applied: its settled mark says so.
        if claim.settle_tried and self.runs.is_settled(claim):
            return
        claim.settle_tried = True
        pipe = self.redis.pipeline(transaction=True)
        write(pipe)
        self.runs.stage_settled(pipe, claim, events)
        oom.execute(self.redis, pipe)  # one atomic script, accepted at maxmemory

    def _durably(self, write: Any, budget: Budget) -> None:
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

    def _send(self, chunks: list[_Chunk], report: Report, claim: Claim, budget: Budget) -> Outcomes:
        """Send what the throttle allows before the deadline; every relay id's outcome."""
        unsent_wait, cause = self._send_chunks(chunks, report, claim, budget)
        return _outcomes(chunks, Unsent(unsent_wait, cause))

    def _after_send(
        self, chunks: list[_Chunk], sent: list[_Chunk], claim: Claim, budget: Budget
    ) -> float:
        """Mark delivered events done first (nothing may fail in between), then tell the
        shared throttle; returns the pause now in force."""
        done = [
            rid for rid, o in _outcomes(chunks, Unsent(0.0)).items()
            if rid not in claim.done and isinstance(o, retry.Outcome)
            and o.kind is retry.Kind.SUCCESS
        ]  # fmt: skip
        self._durably(lambda: self.runs.mark_done(claim, done), budget)
        try:
            return self._report_throttle(sent)
        except broker.QUEUE_ERRORS:
            return 0.0  # Redis is away: no shared pause to tell, nor to obey

    def _send_chunks(
        self, chunks: list[_Chunk], report: Report, claim: Claim, budget: Budget
    ) -> tuple[float, str]:
        """Send; returns how long unsent chunks should wait, and why they were not sent."""
        gate = self.throttle.gate()
        for _ in range(3):
            if gate.go or gate.wait_s > SHORT_WAIT_S:
                break
            if time.monotonic() + gate.wait_s > budget.send_by:
                return gate.wait_s, "deadline"
            time.sleep(gate.wait_s)
            gate = self.throttle.gate()
        if not gate.go:
            return gate.wait_s, "paused"  # every chunk stays unsent, deferred past the pause
        todo = chunks
        if gate.probe:
            # One request tests whether ChurnZero is back before anyone sends more.
            if time.monotonic() > budget.send_by:
                return 0.0, "deadline"
            self._run(self._send_one(chunks[0], 0.0, report, check=False), budget)
            first = chunks[0].outcome
            ok = first is not None and first.kind is not retry.Kind.RETRYABLE
            pause = self._after_send(chunks, [chunks[0]], claim, budget)
            if not ok:
                return pause, "paused"
            todo = chunks[1:]
        if not todo:
            return 0.0, "paused"
        replay = report.lane == "replay"
        learning = self.settings.adaptive_rate and not self.settings.rate_limit_rps
        horizon = ADAPT_MAX_WAIT_S if learning else MAX_RATE_WAIT_S
        delays = self.throttle.reserve(
            len(todo), min(REPLAY_MAX_WAIT_S, horizon) if replay else horizon, report.lane
        )
        if isinstance(delays, float):
            self.redis.hincrby(keys.STATS, keys.Stat.RATELIMIT_WAITS, 1)
            return delays, "replay_share" if replay else "paused"
        if any(d > 0 for d in delays):
            self.redis.hincrby(keys.STATS, keys.Stat.RATELIMIT_WAITS, 1)
        # Chunks beyond the reserved slots stay unsent and come back after the last slot.
        rate_wait = delays[-1] if len(delays) < len(todo) else 0.0
        todo = todo[: len(delays)]

        async def send_all() -> None:
            await asyncio.gather(
                *(
                    self._send_one(c, d, report, check=d > 0, send_by=budget.send_by)
                    for c, d in zip(todo, delays, strict=True)
                )
            )

        in_time = self._run(send_all(), budget)
        late = time.monotonic() > budget.send_by and any(c.outcome is None for c in todo)
        pause = max(self._after_send(chunks, todo, claim, budget), rate_wait)
        return pause, "deadline" if late or not in_time else "paused"

    def _run(self, work: Any, budget: Budget) -> bool:
        """Run sends on this thread's loop until done or the deadline; whether in time.

        Requests start only until `send_by`, so each ends (answered or timed out) before
        the deadline. One still on the wire then (a stalled client) is cancelled and
        counts as unsent: ChurnZero may have had it, so its events may arrive twice.
        """
        remaining = max(budget.deadline - time.monotonic(), 0.1)
        try:
            self.loop.run_until_complete(asyncio.wait_for(work, remaining))
        except TimeoutError:
            return False
        return True

    async def _send_one(
        self, chunk: _Chunk, delay: float, report: Report, *, check: bool,
        send_by: float | None = None,
    ) -> None:  # fmt: skip
        if delay > 0:
            await asyncio.sleep(delay)
        if send_by is not None and time.monotonic() > send_by:
            return  # too late to start: it could not end before the task's deadline
        if check and not self.throttle.gate().go:
            return  # a pause began while this request waited for its slot
        started = time.perf_counter()
        chunk.outcome = await self.client.send(chunk.commands)
        report.request_seconds.append(time.perf_counter() - started)
        report.requests[chunk.outcome.label] += 1
        if chunk.outcome.misconfigured is not None:
            # The operator must act: the events wait (paused, retried), and status says why.
            log.error(
                "churnzero_misconfigured",
                problem=chunk.outcome.misconfigured,
                status=chunk.outcome.status,
                url=self.client.url,
            )
            with contextlib.suppress(*broker.QUEUE_ERRORS):  # the log line says it anyway
                status.record_churnzero_problem(self.redis, chunk.outcome.misconfigured)

    def _report_throttle(self, chunks: list[_Chunk]) -> float:
        sent = [c.outcome for c in chunks if c.outcome is not None]
        if not sent:
            return self.throttle.gate().wait_s
        failures = [o for o in sent if o.kind is retry.Kind.RETRYABLE]
        waits = [o.retry_after_s for o in failures if o.retry_after_s is not None]
        # A 429 without Retry-After still means "slow down": hold everyone back a second
        # (with the self-tuning rate on, a cut of the learned rate instead: relay.throttle).
        if any(o.status == 429 for o in failures) and not waits:
            waits = [1.0]
        cap = self.settings.retry_after_cap_s
        return self.throttle.report(
            successes=len(sent) - len(failures),
            failures=len([o for o in failures if o.status != 429]),
            retry_after_s=retry.clamp_retry_after(max(waits), cap) if waits else None,
            throttled=len([o for o in failures if o.status == 429]),
        )


_OK = retry.Outcome(status=200)


def _outcomes(chunks: list[_Chunk], unsent: Unsent) -> Outcomes:
    """Each relay id's outcome: the worst of the requests that carried its commands."""
    outcomes: Outcomes = {}
    for chunk in chunks:
        outcome: retry.Outcome | Unsent = chunk.outcome if chunk.outcome is not None else unsent
        for rid in chunk.rids:
            outcomes[rid] = worst(outcomes.get(rid, _OK), outcome)
    return outcomes


def _chunk(send: list[tuple[Item, list[Command]]], size: int) -> list[_Chunk]:
    chunks: list[_Chunk] = []
    current = _Chunk([], [])
    for item, commands in send:
        if current.commands and len(current.commands) + len(commands) > size:
            chunks.append(current)
            current = _Chunk([], [])
        if len(commands) > size:  # one event with many traits: several requests of its own
            for start in range(0, len(commands), size):
                chunks.append(_Chunk(commands[start : start + size], [item["id"]]))
            continue
        current.commands.extend(commands)
        current.rids.append(item["id"])
    if current.commands:
        chunks.append(current)
    return chunks


def lane_of(items: list[Any]) -> str:
    """`replay` when every item is a replayed dead letter, else `live`."""
    return "replay" if broker.queue_of(items) == keys.REPLAY_QUEUE else "live"


def _stage_stats(pipe: Any, report: Report, now: float) -> None:
    counts: dict[str, int] = {keys.Stat.DELIVERED: report.delivered}
    if report.lane == "replay":
        counts[keys.Stat.REPLAY_DELIVERED] = report.delivered
    labelled = {
        keys.Stat.SKIPPED: report.skipped,
        keys.Stat.REQUESTS: report.requests,
        keys.Stat.RETRIED: report.retried,
        keys.Stat.ATTRIBUTES: report.attributes,
    }
    for stat, by_label in labelled.items():
        counts.update({stat.of(k): v for k, v in by_label.items()})
    status.stage_counts(pipe, counts)
    if report.delivered:
        status.stage_rate(pipe, status.Rate.DELIVERED, report.delivered, now)
    status.stage_request_seconds(pipe, report.request_seconds)
