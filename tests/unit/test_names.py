"""The new-name guard's pure part: which names commands send, which events it holds."""

from __future__ import annotations

from relay.commands import IncrementAttribute, SetAttribute, TrackEvent
from relay.envelope import Envelope
from relay.plan import Plan, holding, without
from relay.state import names


def track(name: str) -> TrackEvent:
    return TrackEvent(account="A", contact="C", event_name=name, event_date="2024-01-01T00:00:00Z")


def attribute(entity: str, name: str) -> SetAttribute:
    return SetAttribute(account="A", contact="C", entity=entity, name=name, value=1)


def test_names_of_each_kind() -> None:
    commands = [track("Signed Up"), attribute("contact", "plan"), attribute("account", "plan")]
    assert names.names_of(commands) == {
        ("event", "Signed Up"), ("contact_attribute", "plan"), ("account_attribute", "plan"),
    }  # fmt: skip


def test_an_increments_field_name_is_guarded_like_any_other() -> None:
    seats = IncrementAttribute(account="A", contact="C", entity="account", name="Seats", value=2)
    assert names.names_of([seats]) == {("account_attribute", "Seats")}


def item(rid: str) -> Envelope:
    return Envelope.new({"type": "track"}, source="api", received_at=0.0, rid=rid)


def test_hold_moves_only_events_with_a_new_name() -> None:
    plan = Plan(send=[
        (item("old"), [track("Known")]),
        (item("new"), [attribute("contact", "Known"), attribute("contact", "Plna")]),
        (item("sent-before"), [track("Brand New")]),
    ])  # fmt: skip
    new = {("contact_attribute", "Plna"), ("event", "Brand New")}
    holds = names.to_hold(plan.send, new, exempt={"sent-before"})
    assert holds == {"new": [("contact_attribute", "Plna")]}
    held = holding(plan, {rid: [names.note(n) for n in fresh] for rid, fresh in holds.items()})
    assert [item.id for item, _ in held.send] == ["old", "sent-before"]
    assert held.held == [(item("new"), ["new contact attribute name: Plna"])]
    assert len(plan.send) == 3  # a new plan: the one it came from is left as it was


def test_without_drops_commands_and_skips_an_event_left_with_none() -> None:
    plan = Plan(send=[
        (item("both"), [attribute("contact", "a"), attribute("contact", "b")]),
        (item("one"), [attribute("contact", "a")]),
    ])  # fmt: skip
    kept = without(plan, {("both", 0), ("one", 0)}, "stale_attribute")
    assert kept.send == [(item("both"), [attribute("contact", "b")])]
    assert kept.skipped == [(item("one"), "stale_attribute")]
    assert plan.skipped == [] and len(plan.send[0][1]) == 2
