"""The identity map as one batch sees it, event by event, and who each event is about.

relay.plan walks a batch in order; `Memory` is the map read before the batch, updated by
the batch's identify, group and alias calls as they happen (and its deletes), so each
event is resolved with what was known when it happened. `resolve` names an event's ids:
its own, else those kept for its user, else the mapping's contact order; the first
contact sent for a user is kept for that user (the plan pins it once the event has
something to send), and only an explicit contact id moves the user (a `ContactChange`).
Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay import events
from relay.mapping import Mapping
from relay.resolution import (
    Ids,
    Known,
    alias_keys,
    fallback_contact,
    identity_keys,
    learned_contact,
    own_account,
    resolve_key,
)

if TYPE_CHECKING:  # the plan holds what the memory learns; it imports this module
    from relay.plan import Plan


@dataclass(frozen=True)
class ContactChange:
    """An explicit contact id moved a user to another contact: `before` and `after`
    (the account may be unknown on either side, or change too)."""

    user: str
    before: Ids
    after: Ids


def teaching(event: events.AnyEvent, mapping: Mapping, contact: str | None) -> Known | None:
    """What an identify or a group call teaches about its user, if anything (`contact`:
    the event's own contact id)."""
    at = int(event.timestamp.timestamp() * 1000) if event.timestamp else None
    if isinstance(event, events.Group):
        return Known(event.groupId, None, at) if event.groupId else None
    if isinstance(event, events.Identify):
        account = own_account(event, mapping)
        taught = learned_contact(event, mapping, contact)
        update = Known(account, taught.contact, at if account else None, taught.source)
        return update if update != Known() else None
    return None


class Memory:
    """The identity map as the batch sees it at each event: the map read before the
    batch, updated by the batch's identify, group and alias calls in order."""

    def __init__(
        self, plan: Plan, known: AbstractMapping[str, Known], links: AbstractMapping[str, str]
    ) -> None:
        self.plan, self.known, self.links = plan, known, links
        self.so_far: dict[str, Known] = {}
        self.cut: set[str] = set()  # deleted in this batch: stored links no longer count

    def own(self, key: str) -> Known | None:
        return self.so_far.get(key) or self.known.get(key)

    def recall(self, key: str) -> Known | None:
        """What is known of `key`, through its alias link (the link's target wins)."""
        own = self.own(key)
        target = self.plan.links.get(key) or (None if key in self.cut else self.links.get(key))
        linked = self.own(target) if target and target != key else None
        return linked if own is None else own.merged(linked)

    def teach(self, key: str, update: Known) -> None:
        self.so_far[key] = (self.own(key) or Known()).merged(update)
        self.plan.learned[key] = self.plan.learned.get(key, Known()).merged(update)
        if update.account:  # only an account can resolve a waiting event
            self.plan.released.add(key)

    def forget(self, key: str, received_at: float) -> None:
        self.so_far[key] = Known()
        self.cut.add(key)
        self.plan.learned.pop(key, None)
        for source, target in list(self.plan.links.items()):
            if key in (source, target):
                del self.plan.links[source]
        self.plan.forgotten[key] = max(received_at, self.plan.forgotten.get(key, 0.0))

    def link(self, event: events.Alias) -> None:
        assert event.userId is not None and event.previousId is not None
        target = "u:" + event.userId
        before = Known()
        for key in reversed(alias_keys(event)):  # the previous userId wins over anonymousId
            before = before.merged(self.recall(key))
        mine = self.own(target) or Known()
        if before.merged(mine) != mine:
            self.teach(target, before.merged(mine))
        for key in alias_keys(event):
            if key != target:
                self.plan.links[key] = target
                self.plan.released.add(key)


def learn(event: events.AnyEvent, update: Known, memory: Memory, *, soft: bool) -> None:
    """Teach the memory what an identify or group call says of its user (`soft`: the
    call names no contact id of its own, so a kept contact stays)."""
    for key in identity_keys(event):
        known = memory.recall(key)
        if soft and known is not None and known.contact:
            # An email names the contact of a user without one; a kept contact stays (in
            # ChurnZero it is the same person, whose Email attribute changes).
            memory.teach(key, Known(update.account, None, update.at))
            continue
        moved = known is not None and known.contact and update.contact != known.contact
        if moved and update.contact and key == resolve_key(event):
            assert known is not None and known.contact is not None
            before = Ids(known.account or "", known.contact)
            after = Ids(update.account or known.account or "", update.contact)
            memory.plan.contact_changes.append(ContactChange(key, before, after))
        memory.teach(key, update)


NO_CONTACT = object()  # a group call's account is known, and no person to name
NO_ACCOUNT = object()  # no account known for the user yet


def resolve(
    event: events.AnyEvent,
    explicit: tuple[str | None, str | None],
    memory: Memory,
    ahead: dict[str, Known],
    mapping: Mapping,
) -> tuple[Ids | object | None, tuple[str, Known] | None]:
    """The event's ids (None: wait for the user's identity; `NO_CONTACT`: a group call
    no person can be named for), and the contact to keep for its user if it is sent."""
    account, contact = explicit
    key = resolve_key(event) or ""
    remembered = memory.recall(key)
    found = remembered or ahead.get(key) or Known()
    account = account or found.account
    if not account:
        return NO_ACCOUNT, None  # the contact order applies only once the account is known
    if contact:
        return Ids(account, contact), None
    kept = remembered is not None and remembered.contact is not None
    if found.contact:
        pin = None if kept else Known(contact=found.contact, source=found.source)
        contact = found.contact
    else:
        target = memory.plan.links.get(key) or memory.links.get(key) or ""
        aliased = target[2:] if target.startswith("u:") else None
        by_order = fallback_contact(event, mapping, aliased)
        if by_order is None:
            return _no_person(event, account, mapping), None
        contact, source = by_order
        pin = Known(contact=contact, source=source)
    return Ids(account, contact), (key, pin) if pin is not None and key else None


def _no_person(event: events.AnyEvent, account: str, mapping: Mapping) -> Ids | object | None:
    # Account-level writes (a backend's group call with only an anonymousId) go under the
    # mapping's placeholder contact, never kept for the user; without one they cannot
    # be delivered, and no identify will come for a backend job: dead-lettered at once.
    if not isinstance(event, events.Group):
        return None
    placeholder = mapping.identity.account_contact
    return Ids(account, placeholder) if placeholder else NO_CONTACT
