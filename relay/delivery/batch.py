"""Delivering one batch of queued items to ChurnZero: the worker's whole job.

`Delivery.deliver(items, message_id)` runs the stages in order:

    claim     the message (relay.delivery.claims: a message that runs twice is settled once)
    prepare   parse, drop duplicates, resolve, plan, hold new names, check the attribute
              clock (relay.delivery.prepare, the stages `relay preview` runs too)
    send      through the shared throttle, within the task's time limit (.sending)
    settle    every item exactly once, without I/O (.settlement): delivered, skipped
              (with a counted reason), put in the delayed set, or dead-lettered
    stage     the settlement's Redis writes, on one MULTI (.stage)
    execute   that MULTI, fenced, once however often it is retried

Celery is not involved here; the task only calls this.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any

import orjson
import redis
import structlog

from relay import keys
from relay.delivery.churnzero import ChurnZeroClient
from relay.delivery.claims import Claim, Claims, Fenced, State
from relay.delivery.dedupe import Dedupe
from relay.delivery.prepare import Claiming, Prepared, prepare
from relay.delivery.sending import OK, Budget, Sender, chunked, durably
from relay.delivery.settlement import (
    Outcomes,
    Policy,
    Settlement,
    dead_letter,
    group_later,
    settle,
)
from relay.delivery.stage import Report, stage, stage_stats
from relay.delivery.throttle import Throttle
from relay.envelope import decode_all
from relay.mapping import Mapping
from relay.reasons import Reason, Skip
from relay.settings import VISIBILITY_MARGIN_S, Settings
from relay.state import archive, broker, deadletter, names, oom
from relay.state.deadletter import DeadLetter

log = structlog.get_logger("relay.delivery")


# Errors a run passes on rather than dead-letter its message for: Redis away, a fence.
_PASSED_ON: tuple[type[Exception], ...] = (Fenced, *broker.QUEUE_ERRORS)


class MessageBusy(Exception):
    """Another run of this message still holds its lease; give the message back."""


class Delivery:
    """Delivers batches for one thread (it owns an event loop and a connection pool)."""

    def __init__(self, settings: Settings, r: Any, mapping: Mapping) -> None:
        self.settings = settings
        self.redis = r
        self.mapping = mapping
        self.policy = Policy.of(settings)
        self.dedupe = Dedupe(r, settings.dedupe_window_s)
        self.claims = Claims(
            r,
            lease_s=settings.task_time_limit_s + VISIBILITY_MARGIN_S,
            ttl_s=settings.run_record_ttl_s,
        )
        self.names = names.Names(r, max_per_kind=settings.names_max)
        self.access = Claiming(r, self.dedupe)
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
        self.sender = Sender(settings, r, self.claims, self.throttle, self.client)

    def close(self) -> None:
        """Close the connection pool and the loop."""
        self.sender.close()

    def deliver(self, items: list[Any], message_id: str) -> Report:
        """Settle every item of the message (its envelopes, as queued) once, however often
        it runs; see the module docstring. Raises MessageBusy when another run holds it
        past this run's time."""
        budget = Budget.of(self.settings, time.monotonic())
        claim = self._claim(message_id, len(items), budget)
        if claim.state is State.SETTLED:
            # Its first run may have given it back before replicas held the settlement.
            self._replicated(budget)
            return Report(received=len(items), already_settled=True)
        try:
            try:
                return self._deliver(items, claim, budget)
            except _PASSED_ON:
                raise
            except Exception as exc:
                # A malformed message or a bug. Celery would drop the message: keep its
                # events as dead letters instead, with the error.
                log.exception("batch_failed", events=len(items))
                return self._dead_letter_all(items, claim, exc)
        except Fenced as fenced:
            # This run lost its lease while it worked: another run settles the message
            # (or did), and this one's settlement was not written.
            log.warning("settlement_fenced", message_id=message_id, settled=fenced.settled)
            if not fenced.settled:
                raise MessageBusy(message_id) from None
            return Report(received=len(items), already_settled=True)
        except BaseException:
            # Unsettled: the message runs again (Redis hands it out again), and the
            # events marked done are not sent twice.
            with contextlib.suppress(Exception):  # Redis is away: the lease expires anyway
                self.claims.release(claim)
            raise

    def _dead_letter_all(self, items: list[Any], claim: Claim, exc: Exception) -> Report:
        error = f"{type(exc).__name__}: {exc}"[:500]
        report = Report(received=len(items))
        dead = []
        for item in items:
            if isinstance(item, dict) and item.get("id") in claim.done:
                report.delivered += 1
                continue
            dead.append(_worker_error(item, error))
        report.dead[Reason.WORKER_ERROR.value] = len(dead)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        self.claims.stage_fence(pipe, claim)
        deadletter.stage_add(pipe, dead)
        if self.settings.archive:
            records = archive.settled_records(now, dead=dead)
            done = [i for i in items if isinstance(i, dict) and i.get("id") in claim.done]
            records += [archive.item_record(now, i, archive.DELIVERED, None) for i in done]
            archive.stage_records(pipe, records)
        stage_stats(pipe, report, now)
        self.claims.stage_settled(pipe, claim, len(items))
        try:
            oom.execute(self.redis, pipe)
        except redis.ResponseError as exc:
            raise self.claims.fenced(exc) or exc from None
        return report

    def _claim(self, message_id: str, events: int, budget: Budget) -> Claim:
        while True:
            claim = self.claims.claim(message_id, events)
            if claim.state is not State.BUSY:
                return claim
            # Another run (a copy kombu restored while the first still runs) holds the
            # lease: wait for it to settle, or give the message back if it takes long,
            # rather than claim it with too little time left to send.
            now = time.monotonic()
            if now >= budget.claim_by:
                raise MessageBusy(message_id)
            time.sleep(min(max(claim.busy_for_s, 0.05), 1.0, budget.claim_by - now))

    def _deliver(self, items: list[Any], claim: Claim, budget: Budget) -> Report:
        now = time.time()
        report = Report(received=len(items), lane=lane_of(items))
        envelopes, undecodable = decode_all(items)
        prepared = prepare(envelopes, self.access, self.mapping, self.settings, claim.done)
        plan = prepared.plan
        self._note(report, prepared)
        # An earlier run of this message got a 2xx for some events: never send them again.
        outcomes: Outcomes = {rid: OK for rid in claim.done}
        todo = [(item, commands) for item, commands in plan.send if item.id not in claim.done]
        if chunks := chunked(todo, self.settings.churnzero_batch_size):
            outcomes |= self.sender.send(chunks, report, claim, budget)
        settled = settle(plan, outcomes, now, self.policy)
        dead = [_worker_error(item, f"DecodeError: {exc}", now) for item, exc in undecodable]
        dead += [dead_letter(i, Reason.INVALID_EVENT, now, errors=e) for i, e in prepared.invalid]
        settled = replace(settled, dead=dead + settled.dead, later=group_later(settled.later))
        report.count(settled, time.time())

        def write(pipe: Any) -> None:
            stage(
                pipe, prepared, settled, report, now,
                settings=self.settings, dedupe=self.dedupe, known_names=self.names,
            )  # fmt: skip

        # Past the sends, what ChurnZero accepted is known only here: hold on to it
        # through a Redis blip rather than give the message back to be sent again.
        durably(lambda: self._settle_once(claim, len(items), write), budget)
        self._replicated(budget)
        # Settled: nothing from here on may fail the message (it would be dead-lettered
        # whole, its events just delivered or scheduled for retry among them).
        self._after_settled(prepared, settled)
        return report

    def _note(self, report: Report, prepared: Prepared) -> None:
        """Count and log what the stages found before anything is sent."""
        plan = prepared.plan
        report.skipped[Skip.DUPLICATE.value] += len(prepared.duplicates)
        report.attributes.update(plan.attributes)
        if prepared.stale:
            report.attributes[Skip.STALE_ATTRIBUTE.value] += prepared.stale
        report.contact_changes = len(plan.contact_changes)
        for change in plan.contact_changes:
            log.info("contact_changed", user=change.user, account=change.after.account,
                     before=change.before.contact, after=change.after.contact)  # fmt: skip

    def _after_settled(self, prepared: Prepared, settled: Settlement) -> None:
        """Give back the dedupe claims of events not delivered, and remove deleted users'
        dead letters; an error here is logged, never raised."""
        gone = {entry.item.get("id") for entry in settled.dead}
        undelivered = [item for item, _ in prepared.invalid]
        undelivered += [item for item, _ in prepared.parsed if item.id in gone]
        try:  # an unreleased claim only expires
            self.dedupe.release(undelivered)
        except Exception:
            log.exception("dedupe_claims_kept", events=len(undelivered))
        forgotten = prepared.plan.forgotten
        if forgotten:
            # Not in the MULTI (a scan); the delete is settled already, so an error is
            # logged for the operator.
            try:
                removed = deadletter.remove_users(self.redis, set(forgotten))
                log.info("users_deleted", users=len(forgotten), dead_letters=removed)
            except Exception:
                log.exception("users_deleted_dead_letters_kept", users=sorted(forgotten))

    def _replicated(self, budget: Budget) -> None:
        """With `redis_wait_replicas`, return once that many replicas hold everything
        this run wrote (its settlement), before the message is acknowledged: a failover
        then cannot roll the settlement back while the queue has forgotten the message.
        Raises NotReplicated (the message is given back) if they do not in time."""
        replicas = self.settings.redis_wait_replicas
        if replicas:
            timeout_ms = self.settings.redis_wait_timeout_ms
            durably(lambda: broker.confirm_replicated(self.redis, replicas, timeout_ms), budget)

    def _settle_once(self, claim: Claim, events: int, write: Any) -> None:
        # A MULTI whose answer was lost may have been applied: its settled mark says so.
        if claim.settle_tried and self.claims.is_settled(claim):
            return
        claim.settle_tried = True
        pipe = self.redis.pipeline(transaction=True)
        self.claims.stage_fence(pipe, claim)
        write(pipe)
        self.claims.stage_settled(pipe, claim, events)
        try:
            oom.execute(self.redis, pipe)  # one atomic script, accepted at maxmemory
        except redis.ResponseError as exc:
            raise self.claims.fenced(exc) or exc from None


def _worker_error(item: Any, error: str, now: float | None = None) -> DeadLetter:
    # A message the relay did not write (another producer, a hand-edited replay), or a
    # bug: the item is kept as it came when it is JSON, else as text.
    stored = item if isinstance(item, dict) else {"event": item}
    try:
        orjson.dumps(stored)
    except (TypeError, orjson.JSONEncodeError):
        stored = {"event": repr(item)[:32_000]}
    return deadletter.new_entry(stored, Reason.WORKER_ERROR, errors=[error], now=now)


def lane_of(items: list[Any]) -> str:
    """`replay` when every item is a replayed dead letter, else `live`."""
    return "replay" if broker.queue_of(items) == keys.REPLAY_QUEUE else "live"
