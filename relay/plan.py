"""A batch's plan: who each event is about, and what becomes of it before anything is sent.

`plan_batch` works a whole Celery batch at once, in order, so a track resolves against an
identify, group or alias anywhere earlier in the same batch (or, for a user nobody knew
yet, later in it), and a delete forgets its user for the events around it. Who an event
is about comes from relay.resolution: the event itself or, through the identity map, an
earlier call; what it says to ChurnZero comes from relay.translate. Pure, no I/O: the
worker fetches the identity map first (`lookup_keys`, `tombstone_keys`) and writes what
the plan learned afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from relay import events, translate
from relay.commands import Command
from relay.envelope import Envelope
from relay.mapping import Mapping
from relay.parked import Parked, event_ms, parkable
from relay.resolution import (
    Ids,
    Known,
    alias_keys,
    explicit_ids,
    fallback_contact,
    identity_keys,
    learned_contact,
    own_account,
    resolve_key,
)


@dataclass(frozen=True)
class ContactChange:
    """An explicit contact id moved a user to another contact: `before` and `after`
    (the account may be unknown on either side, or change too)."""

    user: str
    before: Ids
    after: Ids


@dataclass
class Plan:
    """What to do with each item of a batch (an item wraps one event with its metadata),
    and what the batch taught: identities (partial, merged into the map), alias links,
    and the users whose waiting tracks may now resolve."""

    send: list[tuple[Envelope, list[Command]]] = field(default_factory=list)
    skipped: list[tuple[Envelope, str]] = field(default_factory=list)
    unresolved: list[Envelope] = field(default_factory=list)
    invalid_event: list[tuple[Envelope, list[str]]] = field(default_factory=list)
    invalid_command: list[tuple[Envelope, list[str]]] = field(default_factory=list)
    # Held by the new-name guard (relay.state.names), with the names: never planned here.
    held: list[tuple[Envelope, list[str]]] = field(default_factory=list)
    learned: dict[str, Known] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    forgotten: dict[str, float] = field(default_factory=dict)  # user key -> delete's receipt
    # Group calls with an account but no person to name as the contact (no account_contact).
    no_contact: list[Envelope] = field(default_factory=list)
    contact_changes: list[ContactChange] = field(default_factory=list)
    # Traits of identifies whose user has no account yet, per user key (newest per trait),
    # to park; and the users whose parked traits can go out now that they are known.
    park: dict[str, dict[str, tuple[int, Any]]] = field(default_factory=dict)
    unpark: list[str] = field(default_factory=list)
    # Attribute writes not sent and values replaced, by reason (relay.translate).
    attributes: Counter[str] = field(default_factory=Counter)


Parsed = list[tuple[Envelope, events.AnyEvent]]


def parse_items(
    items: list[Envelope],
) -> tuple[Parsed, list[tuple[Envelope, list[str]]]]:
    """Each item's event parsed; items whose event no longer parses, with why."""
    good, bad = [], []
    for item in items:
        try:
            good.append((item, events.parse(item.event)))
        except ValidationError as exc:
            bad.append((item, [str(exc).splitlines()[0]]))
    return good, bad


def lookup_keys(parsed: Parsed, mapping: Mapping) -> list[str]:
    """Identity-map keys to fetch before planning: those of events without both ids,
    and both sides of every alias."""
    keys: set[str] = set()
    for _, event in parsed:
        if event.type not in events.DELIVERED_TYPES:
            continue
        if isinstance(event, events.Alias):
            keys.update(alias_keys(event) + identity_keys(event))
        elif None in explicit_ids(event, mapping) or isinstance(event, events.Identify):
            # An identify with both ids may move its user to another contact: the one kept
            # is read to tell.
            key = resolve_key(event)
            if key is not None:
                keys.add(key)
    return sorted(keys)


def parking_keys(parsed: Parsed) -> list[str]:
    """The users whose parked traits a batch may release: those its identify and group
    calls are about, and both sides of its aliases."""
    keys: set[str] = set()
    for _, event in parsed:
        if isinstance(event, events.Identify | events.Group):
            keys.update(identity_keys(event))
        elif isinstance(event, events.Alias):
            keys.update(alias_keys(event) + identity_keys(event))
    return sorted(keys)


def tombstone_keys(parsed: Parsed) -> list[str]:
    """Every user key of the batch: a delete may have been received since its events."""
    keys = {k for _, event in parsed for k in identity_keys(event)}
    return sorted(keys)


def _teaching(event: events.AnyEvent, mapping: Mapping, contact: str | None) -> Known | None:
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


class _Memory:
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


def plan_batch(
    parsed: Parsed,
    known: AbstractMapping[str, Known],
    mapping: Mapping,
    links: AbstractMapping[str, str] | None = None,
    deleted: AbstractMapping[str, float] | None = None,
    parked: AbstractMapping[str, Parked] | None = None,
) -> Plan:
    """Decide every item's fate: commands to send, skip, wait for identity, park, or
    invalid. `deleted`: when each deleted user's delete was received (tombstones);
    `parked`: the parked traits of users the batch may teach (relay.state.parking)."""
    plan = Plan()
    memory = _Memory(plan, known, links or {})
    pending = _deleted_before(parsed, deleted or {})
    # What the whole batch teaches, for a user nobody knew yet (a track that raced ahead
    # of its identify or group call borrows it).
    wanted = []
    ahead: dict[str, Known] = {}
    for n, (item, event) in enumerate(parsed):
        reason = translate.skip_reason(event, item.source, mapping) or _incomplete(event)
        reason = "user_deleted" if n in pending and event.type != "delete" else reason
        if reason:
            plan.skipped.append((item, reason))
            continue
        own = explicit_ids(event, mapping)
        update = _teaching(event, mapping, own[1])
        wanted.append((item, event, own, update))
        for key in identity_keys(event) if update else []:
            ahead[key] = ahead.get(key, Known()).merged(update)
    # In batch order, an event is resolved by what was known when it happened.
    for item, event, explicit, update in wanted:
        if update is not None:
            _learn(event, update, memory, soft=explicit[1] is None)
        if isinstance(event, events.Delete):
            for key in identity_keys(event):
                memory.forget(key, _received_at(item))
            plan.skipped.append((item, "delete_request"))
            continue
        if isinstance(event, events.Alias):
            memory.link(event)
            plan.skipped.append((item, "nothing_to_send"))
            continue
        resolved, pin = _resolve(event, explicit, memory, ahead, mapping)
        if resolved is _NO_CONTACT:
            plan.no_contact.append(item)
            continue
        if resolved is _NO_ACCOUNT and _park(plan, item, event):
            continue
        if not isinstance(resolved, Ids):
            plan.unresolved.append(item)
            continue
        commands = translate.commands(event, resolved, mapping, plan.attributes)
        problems = [p for c in commands for p in c.problems()]
        if problems:
            plan.invalid_command.append((item, sorted(set(problems))))
        elif commands:
            plan.send.append((item, commands))
            if pin is not None:  # the first contact sent for the user is the user's
                memory.teach(*pin)
        else:
            plan.skipped.append((item, "nothing_to_send"))
    for user in sorted(parked or {}):
        now_known = memory.recall(user)
        if now_known is not None and now_known.account:
            plan.unpark.append(user)
    return plan


def _park(plan: Plan, item: Envelope, event: events.AnyEvent) -> bool:
    """Park the traits of an identify whose user has no account yet (Engage's first
    sync sends one for every member of an audience); False: not an identify, or nothing
    worth parking (tracks wait for their user)."""
    if not isinstance(event, events.Identify):
        return False
    traits = parkable(event)
    user = resolve_key(event)
    if not traits or user is None:
        return False
    ms = event_ms(event, item.received_at)
    bag = plan.park.setdefault(user, {})
    for trait, value in traits.items():
        if trait not in bag or bag[trait][0] <= ms:
            bag[trait] = (ms, value)
    plan.skipped.append((item, "parked"))
    return True


def _received_at(item: Envelope) -> float:
    return 0.0 if item.received_at is None else item.received_at


def _deleted_before(parsed: Parsed, deleted: AbstractMapping[str, float]) -> set[int]:
    """Positions of events a delete has since forgotten: received before a stored
    tombstone, or ahead of their user's delete in this batch."""
    out = set()
    ahead_of_delete: set[str] = set()
    for n in range(len(parsed) - 1, -1, -1):
        item, event = parsed[n]
        user_keys = identity_keys(event)
        received = _received_at(item)
        stale = any(received < deleted.get(k, float("-inf")) for k in user_keys)
        if stale or any(k in ahead_of_delete for k in user_keys):
            out.add(n)
        if isinstance(event, events.Delete) and item.source != "api":
            ahead_of_delete.update(user_keys)
    return out


def _learn(event: events.AnyEvent, update: Known, memory: _Memory, *, soft: bool) -> None:
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


def _incomplete(event: events.AnyEvent) -> str | None:
    if isinstance(event, events.Group) and event.groupId is None:
        return "missing_group_id"
    if isinstance(event, events.Alias) and (event.previousId is None or event.userId is None):
        return "incomplete_alias"
    return None


_NO_CONTACT = object()  # a group call's account is known, and no person to name
_NO_ACCOUNT = object()  # no account known for the user yet


def _resolve(
    event: events.AnyEvent,
    explicit: tuple[str | None, str | None],
    memory: _Memory,
    ahead: dict[str, Known],
    mapping: Mapping,
) -> tuple[Ids | object | None, tuple[str, Known] | None]:
    """The event's ids (None: wait for the user's identity; `_NO_CONTACT`: a group call
    no person can be named for), and the contact to keep for its user if it is sent."""
    account, contact = explicit
    key = resolve_key(event) or ""
    remembered = memory.recall(key)
    found = remembered or ahead.get(key) or Known()
    account = account or found.account
    if not account:
        return _NO_ACCOUNT, None  # the contact order applies only once the account is known
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
    return Ids(account, placeholder) if placeholder else _NO_CONTACT
