"""A settled batch's Redis writes, queued on the settlement's MULTI: what
relay.delivery.settlement decided (pure), written once by `stage`.

One place knows the key layouts a settlement touches: the identity map and tombstones,
parked traits, the delayed set, the dead-letter queue, dedupe claims, the remembered
names, the trace record, the archive's records and the status counters. The MULTI is
atomic: a batch is settled whole or not at all (relay.delivery.claims fences it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from relay import keys
from relay.delivery import delayed
from relay.delivery.dedupe import Dedupe
from relay.delivery.prepare import Prepared
from relay.delivery.settlement import Settlement
from relay.reasons import Deferral, Skip
from relay.resolution import resolve_raw_key
from relay.settings import Settings
from relay.state import archive, deadletter, identity, names, parking, recent, status, trace


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
    contact_changes: int = 0  # users an explicit contact id moved
    requests: Counter[str] = field(default_factory=Counter)
    request_seconds: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # receipt to 2xx (s), live events
    resent: Counter[str] = field(default_factory=Counter)  # tried again, may arrive twice

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
            "resent": dict(self.resent),
        }

    def count(self, settled: Settlement, answered: float) -> None:
        """Count a settlement (`later` grouped, every dead letter of the batch in `dead`);
        `answered`: when ChurnZero's answers were in, for live events' latency."""
        self.delivered = len(settled.delivered)
        if self.lane == "live":
            self.latencies = [
                answered - item.received_at
                for item in settled.delivered if item.received_at is not None
            ]  # fmt: skip
        self.skipped.update(settled.skipped)
        for later, _, cause in settled.later:
            self.retried[str(cause)] += len(later)
        for entry in settled.dead:
            self.dead[entry.reason.value] += 1


def stage(
    pipe: Any,
    prepared: Prepared,
    settled: Settlement,
    report: Report,
    now: float,
    *,
    settings: Settings,
    dedupe: Dedupe,
    known_names: names.Names,
) -> None:
    """Queue on `pipe` every write of a settled batch: what its plan learned, parked and
    released, its later and dead events, its counters, dedupe marks, names, trace and
    archive records."""
    plan = prepared.plan
    ttl_s = settings.identity_ttl_s
    # A delete outlives every event received before it: their maximum age.
    tombstone_s = int(settings.max_age_s + settings.identity_wait_s) + 3600
    identity.stage_forget(pipe, plan.forgotten, tombstone_s)
    identity.stage_store(pipe, plan.learned, ttl_s)
    identity.stage_links(pipe, plan.links, ttl_s)
    for user, traits in plan.park.items():
        parking.stage_park(pipe, user, traits, ttl_s)
    parking.stage_release(pipe, prepared.releases(now), keys.Stat.PARKED.of("released"))
    # After the lessons, in the same MULTI: released tracks find them. Before this
    # batch's own waits, which were planned knowing these lessons already.
    identity.stage_release(pipe, plan.released)
    for later, due, cause in settled.later:
        member = delayed.stage_schedule(pipe, later, due, cause)
        if cause == Deferral.IDENTITY_WAIT and member is not None:
            users = [resolve_raw_key(item.event) for item in later]
            wait_s = settings.identity_wait_s + delayed.LEASE_S
            identity.stage_waiting(pipe, member, filter(None, users), wait_s)
    deadletter.stage_add(pipe, settled.dead)
    stage_stats(pipe, report, now)
    dedupe.stage_delivered(pipe, settled.delivered)
    delivered = {item.id for item in settled.delivered}
    sent = [(item, cmds) for item, cmds in plan.send if item.id in delivered]
    known_names.stage_learn(pipe, names.sent_names(sent))
    known_names.stage_held(pipe, prepared.held)
    skipped = [(item, Skip.DUPLICATE) for item in prepared.duplicates]
    trace.stage_record(
        pipe, settings.trace_size, delivered=sent,
        skipped=skipped + plan.skipped, dead=settled.dead,
    )  # fmt: skip
    if settings.archive:
        # The commands of events dead-lettered after they were sent (rejected, retries
        # exhausted) are part of their record.
        tried = {item.id: cmds for item, cmds in plan.send} if settled.dead else None
        archive.stage_settled(
            pipe, now, delivered=sent, skipped=skipped + plan.skipped, dead=settled.dead,
            sent=tried,
        )  # fmt: skip


def stage_stats(pipe: Any, report: Report, now: float) -> None:
    """Queue a batch's counters: totals, by label, rates, request times, latencies."""
    counts: dict[str, int] = {
        keys.Stat.DELIVERED: report.delivered,
        keys.Stat.CONTACT_CHANGES: report.contact_changes,
    }
    if report.lane == "replay":
        counts[keys.Stat.REPLAY_DELIVERED] = report.delivered
    labelled = {
        keys.Stat.SKIPPED: report.skipped,
        keys.Stat.REQUESTS: report.requests,
        keys.Stat.RETRIED: report.retried,
        keys.Stat.ATTRIBUTES: report.attributes,
        keys.Stat.RESENT: report.resent,
    }
    for stat, by_label in labelled.items():
        counts.update({stat.of(k): v for k, v in by_label.items()})
    status.stage_counts(pipe, counts)
    if report.delivered:
        status.stage_rate(pipe, status.Rate.DELIVERED, report.delivered, now)
    status.stage_request_seconds(pipe, report.request_seconds)
    recent.stage_latencies(pipe, report.latencies, now)
