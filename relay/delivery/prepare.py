"""The stages from a message's envelopes to what goes out, named once: the worker runs
them before it sends, `relay preview` to say what the worker would do.

`prepare(items, access, mapping, settings)`: parse each event, drop duplicates, look up
who they are about (the identity map, tombstones, parked traits), plan the batch
(relay.plan), hold events that would send a new name (relay.state.names, hold mode) and
drop attribute writes older than their clock (relay.delivery.attribute_clock). Each stage that
reads Redis does so through `Access`: the worker's `Claiming` takes its dedupe claims and
moves the attribute clocks; a preview's `Peeking` only reads, and remembers what it
would have moved. The same stages in the same order give the same verdicts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relay.delivery import attribute_clock
from relay.delivery.dedupe import Dedupe
from relay.envelope import Envelope
from relay.mapping import Mapping
from relay.memory import ContactChange
from relay.parked import Parked, release_items
from relay.plan import (
    Parsed,
    Plan,
    holding,
    lookup_keys,
    named_ids,
    parking_keys,
    parse_items,
    plan_batch,
    tombstone_keys,
    without,
)
from relay.reasons import Skip
from relay.resolution import Known
from relay.settings import Settings
from relay.state import identity, names


class Access(Protocol):
    """What the stages read of Redis, and claim when they run for real."""

    def duplicates(self, items: list[Envelope]) -> set[str]:
        """Relay ids of items another copy of their event holds (relay.delivery.dedupe)."""
        ...

    def lookup(
        self, wanted: Sequence[str], everyone: Sequence[str], parking: Sequence[str]
    ) -> identity.Lookup:
        """The identity map's answer for a batch (`identity.lookup`)."""
        ...

    def unknown_names(self, wanted: set[names.Name]) -> set[names.Name]:
        """Which of these names the relay has never sent."""
        ...

    def carry_clocks(self, changes: list[ContactChange], ttl_s: int) -> None:
        """Carry the attribute clocks of moved users' old contacts to the new ones."""
        ...

    def reserve_clocks(
        self, checked: list[attribute_clock.Write], ttl_s: int
    ) -> set[tuple[str, int]]:
        """The writes older than their clock (relay id, place); the rest move it."""
        ...


@dataclass
class Prepared:
    """A batch ready to send: its plan, and what the stages found on the way."""

    plan: Plan
    parsed: Parsed  # the events that parsed and are no duplicates
    invalid: list[tuple[Envelope, list[str]]]  # events that no longer parse, with why
    duplicates: list[Envelope]
    parked: dict[str, Parked]  # parked traits of the users the batch may teach
    held: set[names.Name]  # the new names its held events would send
    stale: int  # attribute writes dropped by the clock

    def releases(self, now: float) -> dict[str, tuple[Parked, list[Envelope]]]:
        """Per user the plan now knows, the parked traits and the events that send them."""
        return {
            user: (self.parked[user], release_items(user, self.parked[user], now))
            for user in self.plan.unpark
        }


def prepare(
    items: list[Envelope],
    access: Access,
    mapping: Mapping,
    settings: Settings,
    done: Collection[str] = frozenset(),
) -> Prepared:
    """Run the stages on a batch (see the module docstring). `done`: relay ids an earlier
    run of the message delivered: neither held nor checked against the clock."""
    parsed, invalid = parse_items(items)
    dups = access.duplicates([item for item, _ in parsed])
    duplicates = [item for item, _ in parsed if item.id in dups]
    parsed = [(item, event) for item, event in parsed if item.id not in dups]
    named = named_ids(parsed, mapping)
    found = access.lookup(
        lookup_keys(parsed, mapping, named), tombstone_keys(parsed), parking_keys(parsed)
    )
    plan = plan_batch(parsed, found.known, mapping, found.links, found.deleted, found.parked, named)
    held: set[names.Name] = set()
    if settings.new_names == "hold":
        new = access.unknown_names(names.sent_names(plan.send))
        holds = names.to_hold(plan.send, new, frozenset(done))
        held = {name for fresh in holds.values() for name in fresh}
        plan = holding(plan, {rid: [names.note(n) for n in fresh] for rid, fresh in holds.items()})
    stale: set[tuple[str, int]] = set()
    if clock_s := settings.attribute_clock_ttl_s:
        if plan.contact_changes:  # rare: an explicit contact id moved a user
            access.carry_clocks(plan.contact_changes, clock_s)
        checked = attribute_clock.writes(plan, attribute_clock.stamps(parsed), done)
        stale = access.reserve_clocks(checked, clock_s)
        plan = without(plan, stale, Skip.STALE_ATTRIBUTE)
    return Prepared(plan, parsed, invalid, duplicates, found.parked, held, len(stale))


class Claiming:
    """The worker's access: dedupe claims taken, attribute clocks moved."""

    def __init__(self, r: Any, dedupe: Dedupe) -> None:
        self.r = r
        self.dedupe = dedupe

    def duplicates(self, items: list[Envelope]) -> set[str]:
        """Claim each item's messageId; the ids another copy holds."""
        return self.dedupe.duplicates(items)

    def lookup(
        self, wanted: Sequence[str], everyone: Sequence[str], parking: Sequence[str]
    ) -> identity.Lookup:
        """The identity map's answer."""
        return identity.lookup(self.r, wanted, everyone, parking)

    def unknown_names(self, wanted: set[names.Name]) -> set[names.Name]:
        """The names never sent."""
        return names.unknown(self.r, wanted)

    def carry_clocks(self, changes: list[ContactChange], ttl_s: int) -> None:
        """Carry the clocks over, in Redis."""
        attribute_clock.carry(self.r, changes, ttl_s)

    def reserve_clocks(
        self, checked: list[attribute_clock.Write], ttl_s: int
    ) -> set[tuple[str, int]]:
        """Reserve the writes' clocks; the stale writes."""
        return attribute_clock.reserve(self.r, checked, ttl_s)


class Peeking:
    """A preview's access: reads only. `known` overlays identities on the map (what
    earlier pages of a dry run would teach); the clocks it would move are remembered,
    so reuse one for the pages of a dry run."""

    def __init__(self, r: Any, window_s: int, known: dict[str, Known] | None = None) -> None:
        self.r = r
        self.dedupe = Dedupe(r, window_s)
        self.known = known
        self.clocks = attribute_clock.Peek(r)

    def duplicates(self, items: list[Envelope]) -> set[str]:
        """What the claim would say, claiming nothing."""
        return self.dedupe.peek(items)

    def lookup(
        self, wanted: Sequence[str], everyone: Sequence[str], parking: Sequence[str]
    ) -> identity.Lookup:
        """The identity map's answer, with `known` on top."""
        found = identity.lookup(self.r, wanted, everyone, parking)
        if self.known is not None:
            found.known |= self.known
        return found

    def unknown_names(self, wanted: set[names.Name]) -> set[names.Name]:
        """The names never sent."""
        return names.unknown(self.r, wanted)

    def carry_clocks(self, changes: list[ContactChange], ttl_s: int) -> None:
        """Remember the carry; Redis is left as it is."""
        self.clocks.carry(changes)

    def reserve_clocks(
        self, checked: list[attribute_clock.Write], ttl_s: int
    ) -> set[tuple[str, int]]:
        """The writes a reservation would find stale; Redis is left as it is."""
        return self.clocks.reserve(checked)
