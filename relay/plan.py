"""A batch's plan: who each event is about, and what becomes of it before anything is sent.

`plan_batch` works a whole Celery batch at once, in order, so a track resolves against an
identify, group or alias anywhere earlier in the same batch (or, for a user nobody knew
yet, later in it), and a delete forgets its user for the events around it. Who an event
is about comes from relay.memory (the identity map as the batch sees it at each event)
and relay.resolution; what it says to ChurnZero comes from relay.translate. An identify
of a user with no account yet parks its traits (relay.parked). Pure, no I/O: the worker
fetches the identity map first (`lookup_keys`, `tombstone_keys`, `parking_keys`) and
writes what the plan learned afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from relay import events, translate
from relay.commands import Command
from relay.envelope import Envelope
from relay.mapping import Mapping
from relay.memory import (
    NO_ACCOUNT,
    NO_CONTACT,
    ContactChange,
    Memory,
    learn,
    resolve,
    teaching,
)
from relay.parked import Parked, event_ms, parkable
from relay.reasons import Skip
from relay.resolution import Ids, Known, alias_keys, explicit_ids, identity_keys, resolve_key


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
# The account and contact ids each parsed event names itself (`explicit_ids`), in order.
Named = list[tuple[str | None, str | None]]


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


def named_ids(parsed: Parsed, mapping: Mapping) -> Named:
    """The ids each event names itself: read once, for `lookup_keys` and `plan_batch`."""
    return [explicit_ids(event, mapping) for _, event in parsed]


def lookup_keys(parsed: Parsed, mapping: Mapping, named: Named | None = None) -> list[str]:
    """Identity-map keys to fetch before planning: those of events without both ids,
    and both sides of every alias (`named`: `named_ids` of `parsed`, if known)."""
    keys: set[str] = set()
    for n, (_, event) in enumerate(parsed):
        if event.type not in events.DELIVERED_TYPES:
            continue
        if isinstance(event, events.Alias):
            keys.update(alias_keys(event) + identity_keys(event))
            continue
        own = named[n] if named is not None else explicit_ids(event, mapping)
        if None in own or isinstance(event, events.Identify):
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


def plan_batch(
    parsed: Parsed,
    known: AbstractMapping[str, Known],
    mapping: Mapping,
    links: AbstractMapping[str, str] | None = None,
    deleted: AbstractMapping[str, float] | None = None,
    parked: AbstractMapping[str, Parked] | None = None,
    named: Named | None = None,
) -> Plan:
    """Decide every item's fate: commands to send, skip, wait for identity, park, or
    invalid. `deleted`: when each deleted user's delete was received (tombstones);
    `parked`: the parked traits of users the batch may teach (relay.state.parking);
    `named`: `named_ids(parsed)`, if known."""
    plan = Plan()
    memory = Memory(plan, known, links or {})
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
        own = named[n] if named is not None else explicit_ids(event, mapping)
        update = teaching(event, mapping, own[1])
        wanted.append((item, event, own, update))
        for key in identity_keys(event) if update else []:
            ahead[key] = ahead.get(key, Known()).merged(update)
    # In batch order, an event is resolved by what was known when it happened.
    for item, event, explicit, update in wanted:
        if update is not None:
            learn(event, update, memory, soft=explicit[1] is None)
        if isinstance(event, events.Delete):
            for key in identity_keys(event):
                memory.forget(key, _received_at(item))
            plan.skipped.append((item, Skip.DELETE_REQUEST))
            continue
        if isinstance(event, events.Alias):
            memory.link(event)
            plan.skipped.append((item, Skip.NOTHING_TO_SEND))
            continue
        resolved, pin = resolve(event, explicit, memory, ahead, mapping)
        if resolved is NO_CONTACT:
            plan.no_contact.append(item)
            continue
        if resolved is NO_ACCOUNT and _park(plan, item, event):
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
            plan.skipped.append((item, Skip.NOTHING_TO_SEND))
    for user in sorted(parked or {}):
        now_known = memory.recall(user)
        if now_known is not None and now_known.account:
            plan.unpark.append(user)
    return plan


def holding(plan: Plan, held: AbstractMapping[str, list[str]]) -> Plan:
    """The plan with the events in `held` (relay id -> why, as the new-name guard of
    relay.state.names says) moved from `send` to `held`."""
    if not held:
        return plan
    return replace(
        plan,
        send=[(item, commands) for item, commands in plan.send if item.id not in held],
        held=plan.held + [(item, held[item.id]) for item, _ in plan.send if item.id in held],
    )


def without(plan: Plan, dropped: Collection[tuple[str, int]], reason: str) -> Plan:
    """The plan without the `dropped` commands (relay id, place in the event's commands);
    an event left with nothing to send is skipped for `reason`."""
    if not dropped:
        return plan
    send, skipped = [], list(plan.skipped)
    for item, commands in plan.send:
        kept = [c for m, c in enumerate(commands) if (item.id, m) not in dropped]
        if kept:
            send.append((item, kept))
        else:
            skipped.append((item, reason))
    return replace(plan, send=send, skipped=skipped)


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
    plan.skipped.append((item, Skip.PARKED))
    return True


def _received_at(item: Envelope) -> float:
    return 0.0 if item.received_at is None else item.received_at


def _deleted_before(parsed: Parsed, deleted: AbstractMapping[str, float]) -> set[int]:
    """Positions of events a delete has since forgotten: received before a stored
    tombstone, or ahead of their user's delete in this batch."""
    out: set[int] = set()
    if not deleted and not any(_deletes_ahead(i, e) for i, e in parsed):
        return out  # no tombstone and no delete in the batch: nothing forgotten
    ahead_of_delete: set[str] = set()
    for n in range(len(parsed) - 1, -1, -1):
        item, event = parsed[n]
        user_keys = identity_keys(event)
        received = _received_at(item)
        stale = any(received < deleted.get(k, float("-inf")) for k in user_keys)
        if stale or any(k in ahead_of_delete for k in user_keys):
            out.add(n)
        if _deletes_ahead(item, event):
            ahead_of_delete.update(user_keys)
    return out


def _deletes_ahead(item: Envelope, event: events.AnyEvent) -> bool:
    # A delete from the tracking API is refused (translate.skip_reason): it forgets nothing.
    return isinstance(event, events.Delete) and item.source != "api"


def _incomplete(event: events.AnyEvent) -> str | None:
    if isinstance(event, events.Group) and event.groupId is None:
        return "missing_group_id"
    if isinstance(event, events.Alias) and (event.previousId is None or event.userId is None):
        return "incomplete_alias"
    return None
