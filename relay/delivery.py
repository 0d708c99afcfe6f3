"""Delivering one batch of queued items to ChurnZero: the worker's whole job.

`Delivery.deliver(items)` parses, drops duplicates, resolves identities, translates,
sends (through the shared throttle) and then settles every item exactly once: delivered,
skipped (with a counted reason), put in the delayed set for a later try, or
dead-lettered. Celery is not involved here; the task only calls this.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from relay import deadletter, delayed, identity, keys, retry, status
from relay.churnzero import ChurnZeroClient
from relay.dedupe import Dedupe
from relay.mapping import Mapping
from relay.settings import Settings
from relay.throttle import Throttle
from relay.translate import Command, lookup_keys, parse_items, plan_batch

log = structlog.get_logger("relay.delivery")
Item = dict[str, Any]
SHORT_WAIT_S = 2.0  # pauses up to this long are waited out in the task; longer ones deferred
MAX_RATE_WAIT_S = 5.0
IDENTITY_RETRY_CAP_S = 60.0
_SEVERITY = {retry.Kind.SUCCESS: 0, retry.Kind.RETRYABLE: 1, retry.Kind.PERMANENT: 2}


@dataclass
class Report:
    """What became of a batch, for the canonical log line and the counters."""

    received: int = 0
    delivered: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    request_seconds: list[float] = field(default_factory=list)

    def as_log(self) -> dict[str, Any]:
        """Flat fields for a log line."""
        return {
            "received": self.received,
            "delivered": self.delivered,
            "skipped": dict(self.skipped),
            "dead": dict(self.dead),
            "retried": dict(self.retried),
            "requests": dict(self.requests),
        }


@dataclass
class _Chunk:
    commands: list[Command]
    rids: list[str]
    outcome: retry.Outcome | None = None  # None: not sent (paused or rate-limited)


class Delivery:
    """Delivers batches for one thread (it owns an event loop and a connection pool)."""

    def __init__(self, settings: Settings, r: Any, mapping: Mapping) -> None:
        self.settings = settings
        self.redis = r
        self.mapping = mapping
        self.dedupe = Dedupe(r, settings.dedupe_window_s)
        self.throttle = Throttle(
            r, rate_limit_rps=settings.rate_limit_rps, outage_threshold=settings.outage_threshold
        )
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

    def deliver(self, items: list[Item]) -> Report:
        """Settle every item of the batch; see the module docstring."""
        n = len(items)
        self.redis.pipeline(transaction=False).decrby(keys.DEPTH_READY, n).incrby(
            keys.DEPTH_INFLIGHT, n
        ).execute()
        try:
            return self._deliver(items)
        finally:
            self.redis.decrby(keys.DEPTH_INFLIGHT, n)

    def _deliver(self, items: list[Item]) -> Report:
        now = time.time()
        report = Report(received=len(items))
        dead: list[dict[str, Any]] = []
        later: list[tuple[list[Item], float, str]] = []  # items, due, cause

        parsed, bad = parse_items(items)
        dead += [deadletter.new_entry(i, "invalid_event", errors=e, now=now) for i, e in bad]
        dups = self.dedupe.duplicates([item for item, _ in parsed])
        report.skipped["duplicate"] += len(dups)
        parsed = [(item, event) for item, event in parsed if item["id"] not in dups]
        known = identity.lookup(self.redis, lookup_keys(parsed, self.mapping))
        plan = plan_batch(parsed, known, self.mapping)
        for _, reason in plan.skipped:
            report.skipped[reason] += 1
        for item, problems in plan.invalid_event + plan.invalid_command:
            dead.append(deadletter.new_entry(item, "invalid_command", errors=problems, now=now))
        for item in plan.unresolved:
            waited = now - float(item.get("received_at", now))
            if waited >= self.settings.identity_wait_s:
                dead.append(deadletter.new_entry(
                    item, "unresolved_identity", now=now,
                    errors=["no account/contact ids, and no identify call for this user"],
                ))  # fmt: skip
            else:
                wait = retry.compute_backoff(
                    int(item.get("attempts", 0)), base_s=1.0, cap_s=IDENTITY_RETRY_CAP_S
                )
                wait = min(max(wait, 0.5), self.settings.identity_wait_s - waited)
                later.append(([_attempted(item, now)], now + wait, "identity_wait"))

        by_rid = {item["id"]: item for item, _ in plan.send}
        chunks = _chunk(plan.send, self.settings.churnzero_batch_size)
        unsent_wait = self._send(chunks, report) if chunks else 0.0
        worst: dict[str, retry.Outcome | None] = {}
        for chunk in chunks:
            for rid in chunk.rids:
                worst[rid] = _worse(worst.get(rid, _OK), chunk.outcome)
        self._settle(by_rid, worst, now, unsent_wait, report, dead, later)

        pipe = self.redis.pipeline(transaction=True)
        identity.stage_store(pipe, plan.learned, self.settings.identity_ttl_s)
        for batch, due, cause in _group_later(later):
            delayed.stage_schedule(pipe, batch, due)
            report.retried[cause] += len(batch)
        deadletter.stage_add(pipe, dead)
        for entry in dead:
            report.dead[entry["reason"]] += 1
        _stage_stats(pipe, report, now)
        pipe.execute()
        self.dedupe.release([e["item"] for e in dead if isinstance(e["item"], dict)])
        return report

    def _settle(
        self,
        by_rid: dict[str, Item],
        worst: dict[str, retry.Outcome | None],
        now: float,
        unsent_wait: float,
        report: Report,
        dead: list[dict[str, Any]],
        later: list[tuple[list[Item], float, str]],
    ) -> None:
        s = self.settings
        for rid, outcome in worst.items():
            item = by_rid[rid]
            if outcome is None:  # never sent: paused or rate-limited, not the event's fault
                later.append(([item], now + unsent_wait + random.uniform(0, 1.0), "paused"))
            elif outcome.kind is retry.Kind.SUCCESS:
                report.delivered += 1
            elif outcome.kind is retry.Kind.PERMANENT:
                dead.append(deadletter.new_entry(
                    _attempted(item, now), "rejected", status=outcome.status,
                    response=outcome.excerpt, now=now,
                ))  # fmt: skip
            else:
                tried = _attempted(item, now)
                started = float(tried["first_failure"])
                if retry.expired(started, now, s.max_age_s):
                    dead.append(deadletter.new_entry(
                        tried, "retries_exhausted", status=outcome.status,
                        response=outcome.excerpt or outcome.error, now=now,
                    ))  # fmt: skip
                    continue
                wait = retry.next_delay(
                    outcome, int(tried["attempts"]), base_s=s.backoff_base_s, cap_s=s.backoff_cap_s
                )
                wait = min(wait, max(s.max_age_s - (now - started), 0.0))
                later.append(([tried], now + wait, outcome.label))

    def _send(self, chunks: list[_Chunk], report: Report) -> float:
        """Send what the throttle allows; returns how long unsent chunks should wait."""
        gate = self.throttle.gate()
        for _ in range(3):
            if gate.go or gate.wait_s > SHORT_WAIT_S:
                break
            time.sleep(gate.wait_s)
            gate = self.throttle.gate()
        if not gate.go:
            return gate.wait_s  # every chunk stays unsent and is deferred past the pause
        todo = chunks
        if gate.probe:
            # One request tests whether ChurnZero is back before anyone sends more.
            self.loop.run_until_complete(self._send_one(chunks[0], 0.0, report, check=False))
            first = chunks[0].outcome
            ok = first is not None and first.kind is not retry.Kind.RETRYABLE
            pause = self._report_throttle([chunks[0]])
            if not ok:
                return pause
            todo = chunks[1:]
        if not todo:
            return 0.0
        delays = self.throttle.reserve(len(todo), MAX_RATE_WAIT_S)
        if isinstance(delays, float):
            self.redis.hincrby(keys.STATS, "ratelimit_waits", 1)
            return delays
        if any(d > 0 for d in delays):
            self.redis.hincrby(keys.STATS, "ratelimit_waits", 1)
        # Chunks beyond the reserved slots stay unsent and come back after the last slot.
        rate_wait = delays[-1] if len(delays) < len(todo) else 0.0
        todo = todo[: len(delays)]

        async def send_all() -> None:
            await asyncio.gather(
                *(
                    self._send_one(c, d, report, check=d > 0)
                    for c, d in zip(todo, delays, strict=True)
                )
            )

        self.loop.run_until_complete(send_all())
        return max(self._report_throttle(todo), rate_wait)

    async def _send_one(self, chunk: _Chunk, delay: float, report: Report, *, check: bool) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
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
            status.record_churnzero_problem(self.redis, chunk.outcome.misconfigured)

    def _report_throttle(self, chunks: list[_Chunk]) -> float:
        sent = [c.outcome for c in chunks if c.outcome is not None]
        if not sent:
            return self.throttle.gate().wait_s
        failures = [o for o in sent if o.kind is retry.Kind.RETRYABLE]
        waits = [o.retry_after_s for o in failures if o.retry_after_s is not None]
        # A 429 without Retry-After still means "slow down": hold everyone back a second.
        if any(o.status == 429 for o in failures) and not waits:
            waits = [1.0]
        return self.throttle.report(
            successes=len(sent) - len(failures),
            failures=len([o for o in failures if o.status != 429]),
            retry_after_s=max(waits) if waits else None,
        )


_OK = retry.Outcome(status=200)


def _worse(a: retry.Outcome | None, b: retry.Outcome | None) -> retry.Outcome | None:
    if a is None or b is None:
        return None
    return a if _SEVERITY[a.kind] >= _SEVERITY[b.kind] else b


def _attempted(item: Item, now: float) -> Item:
    out = dict(item)
    out["attempts"] = int(item.get("attempts", 0)) + 1
    out["first_failure"] = item.get("first_failure") or item.get("received_at") or now
    return out


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


def _group_later(later: list[tuple[list[Item], float, str]]) -> list[tuple[list[Item], float, str]]:
    # One delayed-set member per cause and (rounded) due second keeps the set small.
    groups: dict[tuple[str, int], tuple[list[Item], float]] = {}
    for items, due, cause in later:
        key = (cause, int(due))
        batch, first_due = groups.get(key, ([], due))
        batch.extend(items)
        groups[key] = (batch, min(first_due, due))
    return [(batch, due, cause) for (cause, _), (batch, due) in groups.items()]


def _stage_stats(pipe: Any, report: Report, now: float) -> None:
    counts = {"delivered": report.delivered}
    counts.update({f"skipped:{k}": v for k, v in report.skipped.items()})
    counts.update({f"requests:{k}": v for k, v in report.requests.items()})
    counts.update({f"retried:{k}": v for k, v in report.retried.items()})
    for name, value in counts.items():
        if value:
            pipe.hincrby(keys.STATS, name, value)
    if report.delivered:
        status.stage_rate(pipe, "delivered", report.delivered, now)
    status.stage_request_seconds(pipe, report.request_seconds)
