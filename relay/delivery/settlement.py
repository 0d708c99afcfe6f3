"""Settlement rules: what becomes of each event of a batch, decided once, without I/O.

`settle(plan, outcomes, now, policy)` takes the translation plan of a batch and, for
each event that was to be sent, the worst outcome of its requests (or `Unsent` when
the throttle, the rate limit or the task's deadline kept it back) and says, for every
event, exactly one of:

    delivered        a 2xx for every request carrying its commands
    skipped          the plan skipped it (a counted reason)
    dead             invalid, rejected by ChurnZero, retries exhausted, never resolved,
                     or held by the new-name guard
    later            back to the delayed set at a due time, with a cause

Every deferral, whatever its cause, is aged from the event's receipt against
`max_age_s`, so nothing waits for ever. The identity wait counts from the first time a
worker saw the event, so a backlog longer than the wait does not dead-letter tracks
that never had a chance to meet their identify.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from relay import retry
from relay.envelope import Envelope
from relay.plan import Plan
from relay.reasons import Deferral, Reason
from relay.resolution import resolve_raw_key
from relay.settings import Settings
from relay.state import deadletter

IDENTITY_RETRY_CAP_S = 60.0
NO_CONTACT_HELP = (
    "a group call with an account but no person to name as its ChurnZero contact (no "
    "userId, no contact known for its anonymousId): set [identity] account_contact in the "
    'mapping file (e.g. "segment-account-sync") to deliver account attributes under that '
    "contact, or send the call with a userId; then replay"
)
_SEVERITY = {retry.Kind.SUCCESS: 0, retry.Kind.RETRYABLE: 1, retry.Kind.PERMANENT: 2}


@dataclass(frozen=True)
class Unsent:
    """The event's commands were not sent: wait this long, for this cause, then retry."""

    wait_s: float
    cause: str = Deferral.PAUSED


@dataclass(frozen=True)
class Policy:
    """The settings that settlement reads."""

    max_age_s: float
    identity_wait_s: float
    backoff_base_s: float
    backoff_cap_s: float
    retry_after_cap_s: float

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        """The policy of a deployment's settings."""
        return cls(
            max_age_s=settings.max_age_s,
            identity_wait_s=settings.identity_wait_s,
            backoff_base_s=settings.backoff_base_s,
            backoff_cap_s=settings.backoff_cap_s,
            retry_after_cap_s=settings.retry_after_cap_s,
        )


@dataclass
class Settlement:
    """Every event of a batch, settled: see the module docstring."""

    delivered: list[Envelope] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    dead: list[deadletter.DeadLetter] = field(default_factory=list)
    later: list[tuple[list[Envelope], float, str]] = field(default_factory=list)  # due, cause


Outcomes = dict[str, retry.Outcome | Unsent]


def worst(a: retry.Outcome | Unsent, b: retry.Outcome | Unsent) -> retry.Outcome | Unsent:
    """The outcome that decides an event whose commands went out in several requests."""
    if isinstance(a, Unsent):
        return a
    if isinstance(b, Unsent):
        return b
    return a if _SEVERITY[a.kind] >= _SEVERITY[b.kind] else b


def settle(
    plan: Plan,
    outcomes: Outcomes,
    now: float,
    policy: Policy,
    rng: random.Random | None = None,
) -> Settlement:
    """Settle every event of `plan`; `outcomes` holds one entry per relay id sent."""
    out = Settlement()
    for _item, reason in plan.skipped:
        out.skipped[str(reason)] += 1
    for item, problems in plan.invalid_event + plan.invalid_command:
        out.dead.append(dead_letter(item, Reason.INVALID_COMMAND, now, errors=problems))
    for item, problems in plan.held:
        out.dead.append(dead_letter(item, Reason.NEW_NAME, now, errors=problems))
    for item in plan.no_contact:
        out.dead.append(dead_letter(item, Reason.NO_CONTACT, now, errors=[NO_CONTACT_HELP]))
    for item in plan.unresolved:
        _wait_for_identity(item, now, policy, out, rng)
    for item, _ in plan.send:
        outcome = outcomes[item.id]
        kind = outcome.kind if isinstance(outcome, retry.Outcome) else None
        if kind is retry.Kind.SUCCESS:
            out.delivered.append(item)
        elif kind is retry.Kind.PERMANENT and isinstance(outcome, retry.Outcome):
            out.dead.append(dead_letter(
                item.attempted(now, outcome.status), Reason.REJECTED, now, status=outcome.status,
                response=outcome.excerpt,
            ))  # fmt: skip
        else:
            _defer(item, outcome, now, policy, out, rng)
    return out


def _defer(
    item: Envelope,
    outcome: retry.Outcome | Unsent,
    now: float,
    policy: Policy,
    out: Settlement,
    rng: random.Random | None,
) -> None:
    tried = (
        item.attempted(now, outcome.status, outcome.error or outcome.misconfigured)
        if isinstance(outcome, retry.Outcome) else item
    )  # fmt: skip
    received = received_at(tried, now)
    if retry.expired(received, now, policy.max_age_s):
        status: int | None = None
        response: str | None = None
        if isinstance(outcome, retry.Outcome):
            status, response = outcome.status, outcome.excerpt or outcome.error
        else:
            response = f"never sent: {outcome.cause}"
        out.dead.append(
            dead_letter(tried, Reason.RETRIES_EXHAUSTED, now, status=status, response=response)
        )
        return
    if isinstance(outcome, Unsent):
        wait, cause = outcome.wait_s + (rng or random).uniform(0, 1.0), outcome.cause
    else:
        wait = retry.next_delay(
            outcome, tried.attempts, base_s=policy.backoff_base_s,
            cap_s=policy.backoff_cap_s, retry_after_cap_s=policy.retry_after_cap_s,
        )  # fmt: skip
        cause = outcome.label
    wait = min(wait, max(policy.max_age_s - (now - received), 0.0))
    out.later.append(([tried], now + wait, cause))


def _wait_for_identity(
    item: Envelope, now: float, policy: Policy, out: Settlement, rng: random.Random | None
) -> None:
    first_seen = now if item.first_seen is None else item.first_seen
    seen = replace(item, first_seen=first_seen)
    waited = now - first_seen
    aged = retry.expired(received_at(seen, now), now, policy.max_age_s)
    if waited >= policy.identity_wait_s or aged:
        out.dead.append(dead_letter(
            seen, Reason.UNRESOLVED_IDENTITY, now,
            errors=["no account for this user: no ids, and no group, identify, alias or import"],
        ))  # fmt: skip
        return
    wait = retry.compute_backoff(seen.attempts, base_s=1.0, cap_s=IDENTITY_RETRY_CAP_S, rng=rng)
    wait = min(max(wait, 0.5), policy.identity_wait_s - waited)
    # Each wait counts as an attempt: the backoff grows with them.
    out.later.append(
        ([replace(seen, attempts=seen.attempts + 1)], now + wait, Deferral.IDENTITY_WAIT)
    )


def received_at(item: Envelope, now: float) -> float:
    """When ingest received the event (an envelope without it counts from now)."""
    return now if item.received_at is None else item.received_at


def dead_letter(
    item: Envelope, reason: Reason, now: float, **details: Any
) -> deadletter.DeadLetter:
    """The dead-letter entry of an envelope (`details`: as `deadletter.new_entry` takes)."""
    return deadletter.new_entry(item.to_dict(), reason, now=now, **details)


def group_later(
    later: list[tuple[list[Envelope], float, str]],
) -> list[tuple[list[Envelope], float, str]]:
    """One delayed-set member per cause and due second keeps the set small; replayed
    dead letters apart from live events, so they come back in their own lane; identity
    waits also per user, so the member indexed under a user (relay.state.identity) holds only
    that user's tracks."""
    groups: dict[tuple[str, int, bool, str], tuple[list[Envelope], float]] = {}
    for items, due, cause in later:
        for item in items:
            user = resolve_raw_key(item.event) if cause == Deferral.IDENTITY_WAIT else None
            key = (cause, int(due), bool(item.replayed_from), user or "")
            member, first_due = groups.get(key, ([], due))
            member.append(item)
            groups[key] = (member, min(first_due, due))
    return [(member, due, cause) for (cause, *_), (member, due) in groups.items()]
