"""The settlement rules, table-tested: every event of a batch ends in exactly one place."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from relay.delivery.settlement import Policy, Settlement, Unsent, group_later, settle, worst
from relay.envelope import Envelope
from relay.plan import Plan
from relay.retry import Outcome

NOW = 1_800_000_000.0
POLICY = Policy(
    max_age_s=4 * 3600,
    identity_wait_s=600,
    backoff_base_s=1.0,
    backoff_cap_s=300.0,
    retry_after_cap_s=300.0,
)
COMMAND = {"action": "trackEvent", "eventName": "E"}


def item(rid: str = "r1", *, age_s: float = 1.0, user: str = "u", **extra: Any) -> Envelope:
    event = {"type": "track", "userId": user, "event": "E"}
    return Envelope(id=rid, source="api", received_at=NOW - age_s, event=event, **extra)


@dataclass
class Case:
    plan: Plan
    outcomes: dict[str, Outcome | Unsent] = field(default_factory=dict)
    delivered: int = 0
    dead: list[str] = field(default_factory=list)  # reasons
    later: list[str] = field(default_factory=list)  # causes
    skipped: dict[str, int] = field(default_factory=dict)


def sending(*items: Envelope) -> Plan:
    return Plan(send=[(i, [COMMAND]) for i in items])


CASES = {
    "2xx delivers": Case(sending(item()), {"r1": Outcome(200)}, delivered=1),
    "400 is rejected for good": Case(sending(item()), {"r1": Outcome(400)}, dead=["rejected"]),
    "503 is retried": Case(sending(item()), {"r1": Outcome(503)}, later=["5xx"]),
    "no answer is retried": Case(
        sending(item()), {"r1": Outcome(None, error="timeout")}, later=["timeout"]
    ),
    "429 is retried": Case(sending(item()), {"r1": Outcome(429, retry_after_s=2)}, later=["429"]),
    "unsent waits out the pause": Case(sending(item()), {"r1": Unsent(30)}, later=["paused"]),
    "unsent at the deadline comes back": Case(
        sending(item()), {"r1": Unsent(0, "deadline")}, later=["deadline"]
    ),
    "unsent past max age is exhausted": Case(
        sending(item(age_s=5 * 3600)), {"r1": Unsent(30)}, dead=["retries_exhausted"]
    ),
    "retryable past max age is exhausted": Case(
        sending(item(age_s=5 * 3600)), {"r1": Outcome(503)}, dead=["retries_exhausted"]
    ),
    "unresolved waits for its identify": Case(Plan(unresolved=[item()]), later=["identity_wait"]),
    "unresolved too long is dead": Case(
        Plan(unresolved=[item(first_seen=NOW - 601)]), dead=["unresolved_identity"]
    ),
    # A backlog older than the identity wait: the wait counts from the first sight.
    "a late first sight still waits": Case(
        Plan(unresolved=[item(age_s=3600)]), later=["identity_wait"]
    ),
    "unresolved past max age is dead": Case(
        Plan(unresolved=[item(age_s=5 * 3600, first_seen=NOW - 10)]),
        dead=["unresolved_identity"],
    ),
    "skips are counted": Case(
        Plan(skipped=[(item(), "unsupported_type"), (item("r2"), "duplicate")]),
        skipped={"unsupported_type": 1, "duplicate": 1},
    ),
    "invalid commands are dead": Case(
        Plan(invalid_command=[(item(), ["eventName is empty"])]), dead=["invalid_command"]
    ),
    "each event on its own": Case(
        sending(item("a"), item("b"), item("c")),
        {"a": Outcome(200), "b": Outcome(422), "c": Unsent(5)},
        delivered=1,
        dead=["rejected"],
        later=["paused"],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_event_ends_in_exactly_one_place(case: Case) -> None:
    out = settle(case.plan, case.outcomes, NOW, POLICY, random.Random(1))
    assert len(out.delivered) == case.delivered
    assert [e.reason for e in out.dead] == case.dead
    assert [cause for _, _, cause in out.later] == case.later
    assert dict(out.skipped) == case.skipped
    total = len(out.delivered) + len(out.dead) + sum(len(i) for i, _, _ in out.later)
    assert total + sum(out.skipped.values()) == _events(case.plan)


def _events(plan: Plan) -> int:
    return (len(plan.send) + len(plan.skipped) + len(plan.unresolved)
            + len(plan.invalid_event) + len(plan.invalid_command))  # fmt: skip


def _only_later(out: Settlement) -> tuple[Envelope, float]:
    [([deferred], due, _)] = out.later
    return deferred, due - NOW


def test_a_failed_attempt_is_counted_and_stamped() -> None:
    deferred, wait = _only_later(settle(sending(item()), {"r1": Outcome(503)}, NOW, POLICY))
    assert deferred.attempts == 1 and deferred.first_failure == NOW
    assert 0 <= wait <= POLICY.backoff_base_s * 2


def test_an_unsent_event_is_not_an_attempt() -> None:
    deferred, wait = _only_later(settle(sending(item()), {"r1": Unsent(30)}, NOW, POLICY))
    assert deferred.attempts == 0 and deferred.first_failure is None
    assert 30 <= wait <= 31


def test_retry_after_of_a_day_waits_no_longer_than_the_cap() -> None:
    outcome = Outcome(429, retry_after_s=86_400)
    _, wait = _only_later(settle(sending(item()), {"r1": outcome}, NOW, POLICY))
    assert POLICY.retry_after_cap_s <= wait <= POLICY.retry_after_cap_s + 0.25


def test_no_wait_outlives_the_max_age() -> None:
    old = item(age_s=POLICY.max_age_s - 10)
    _, wait = _only_later(settle(sending(old), {"r1": Unsent(3600)}, NOW, POLICY))
    assert wait <= 10


def test_the_identity_wait_starts_at_first_sight_and_keeps_it() -> None:
    first, wait = _only_later(settle(Plan(unresolved=[item(age_s=900)]), {}, NOW, POLICY))
    assert first.first_seen == NOW and 0.5 <= wait <= 60
    again, _ = _only_later(settle(Plan(unresolved=[first]), {}, NOW + 30, POLICY))
    assert again.first_seen == NOW and again.attempts == 2


def test_the_worst_outcome_of_an_event_decides() -> None:
    assert worst(Outcome(200), Outcome(503)).status == 503  # type: ignore[union-attr]
    assert worst(Outcome(503), Outcome(400)).status == 400  # type: ignore[union-attr]
    assert isinstance(worst(Outcome(400), Unsent(1)), Unsent)


def test_later_events_share_a_member_per_cause_and_second() -> None:
    a, b, c = item("a"), item("b"), item("c")
    grouped = group_later(
        [([a], NOW + 1.2, "5xx"), ([b], NOW + 1.7, "5xx"), ([c], NOW + 1.5, "429")]
    )
    assert sorted((len(i), cause) for i, _, cause in grouped) == [(1, "429"), (2, "5xx")]
    assert min(due for _, due, cause in grouped if cause == "5xx") == NOW + 1.2


def test_identity_waits_are_grouped_per_user() -> None:
    def of(rid: str, user: str) -> Envelope:
        return item(rid, user=user)

    grouped = group_later([
        ([of("r1", "ann")], NOW + 1.2, "identity_wait"),
        ([of("r2", "bob")], NOW + 1.5, "identity_wait"),
        ([of("r3", "ann")], NOW + 1.7, "identity_wait"),
        ([of("r4", "ann")], NOW + 1.1, "5xx"), ([of("r5", "bob")], NOW + 1.3, "5xx"),
    ])  # fmt: skip
    assert sorted(([i.id for i in batch], cause) for batch, _, cause in grouped) == [
        (["r1", "r3"], "identity_wait"), (["r2"], "identity_wait"), (["r4", "r5"], "5xx"),
    ]  # fmt: skip
