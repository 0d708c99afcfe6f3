"""Who an event is about: its ChurnZero account and contact, without I/O.

An event's account: its own `accountExternalId` trait (or a mapped path), else
`context.groupId`, else (a group call) its `groupId`, else what the relay learned for
the user (the latest group call, an identify with ids, an alias, an import).
Its contact, once the account is known: its own `contactExternalId` trait, else the
contact the relay keeps for the user, else the first of the mapping's `contact_order` the
event carries (default: `email`, then `userId`). The first contact sent for a user is
kept for that user (relay.plan pins it); only an explicit contact id moves the user.

Identity-map keys are `u:<userId>` and `a:<anonymousId>`; an event with a userId is
resolved by it alone (on a shared browser the anonymousId is someone else's).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from relay import events
from relay.mapping import CONTACT_ID, Mapping

ACCOUNT_KEYS = ("accountExternalId", "accountExternalID")
CONTACT_KEYS = ("contactExternalId", "contactExternalID")
ID_KEYS = frozenset(ACCOUNT_KEYS + CONTACT_KEYS)


@dataclass(frozen=True, slots=True)
class Ids:
    """A ChurnZero account and contact, by their external ids."""

    account: str
    contact: str


# Where a kept contact came from, besides the `contact_order` source that named it:
# these two may replace a contact the relay already keeps for the user.
IMPORTED = "import"
FIRM_SOURCES = frozenset({CONTACT_ID, IMPORTED})


@dataclass(frozen=True, slots=True)
class Known:
    """What the relay knows of a user: an account, a contact, either or both; `at` is
    the event time (epoch ms) of the call that named the account, when known; `source`
    says where the contact came from (`contactExternalId`, `import`, or the
    `contact_order` source: `email`, `userId`...)."""

    account: str | None = None
    contact: str | None = None
    at: int | None = None
    source: str | None = None

    def merged(self, newer: Known | None) -> Known:
        """This knowledge updated by `newer` (its unset fields keep this one's). The
        account of an older call (both times known) does not replace a newer one: a
        late or retried group call must not move the user back."""
        if newer is None:
            return self
        older = newer.at is not None and self.at is not None and newer.at < self.at
        take = bool(newer.account) and not older
        account, at = (newer.account, newer.at) if take else (self.account, self.at)
        if newer.contact:
            return Known(account, newer.contact, at, newer.source)
        return Known(account, self.contact, at, self.source)


def _lookup(source: Any, path: str) -> Any:
    if not path:
        return source
    for part in path.split("."):
        if not isinstance(source, dict):
            return None
        source = source.get(part)
    return source


def id_value(value: Any) -> str | None:
    """An id as text, or None when the value cannot be an id (blank, bool, object)."""
    if isinstance(value, str):  # the usual case first: ids are text
        return value.strip() or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 123.0 is the id 123 after a trip through a float
    if isinstance(value, int | float):
        return str(value)
    return None


def _at(event: events.AnyEvent, path: str) -> str | None:
    head, _, rest = path.partition(".")
    return id_value(_lookup(getattr(event, head, None), rest))


def _bags(event: events.AnyEvent) -> list[dict[str, Any]]:
    # A group call's traits describe the account, never the user: not searched for ids.
    if isinstance(event, events.Identify):
        own: dict[str, Any] = event.traits
    elif isinstance(event, events.Track):
        own = event.properties
    else:
        own = {}
    context_traits = event.context.get("traits")
    return [own] + ([context_traits] if isinstance(context_traits, dict) else [])


def _first_id(
    bags: Iterable[dict[str, Any]], keys: tuple[str, ...], event: events.AnyEvent,
    paths: Iterable[str],
) -> str | None:  # fmt: skip
    for bag in bags:
        for key in keys:
            value = bag.get(key)
            found = None if value is None else id_value(value)  # most keys are absent
            if found:
                return found
    for path in paths:
        found = _at(event, path)
        if found:
            return found
    return None


def own_account(event: events.AnyEvent, mapping: Mapping) -> str | None:
    """The account id in the event's own traits or properties (or a mapped path)."""
    return _own_account(_bags(event), event, mapping)


def _own_account(
    bags: list[dict[str, Any]], event: events.AnyEvent, mapping: Mapping
) -> str | None:
    return _first_id(bags, ACCOUNT_KEYS, event, mapping.identity.account_paths)


def explicit_ids(event: events.AnyEvent, mapping: Mapping) -> tuple[str | None, str | None]:
    """The account and contact ids the event itself names (either may be missing):
    the account from its traits, else `context.groupId`, else a group call's groupId."""
    bags = _bags(event)
    account = _own_account(bags, event, mapping)
    if account is None:
        account = id_value(event.context.get("groupId"))
    if account is None and isinstance(event, events.Group):
        account = event.groupId
    contact = None
    if CONTACT_ID in mapping.identity.contact_order:
        contact = _first_id(bags, CONTACT_KEYS, event, mapping.identity.contact_paths)
    return account, contact


def fallback_contact(
    event: events.AnyEvent, mapping: Mapping, user_id: str | None = None
) -> tuple[str, str] | None:
    """The contact id by the mapping's `contact_order` past `contactExternalId`, with the
    source that named it: the event's email (traits or context.traits), userId (or
    `user_id`, the user an alias made it), anonymousId or a dotted path."""
    bags = _bags(event)
    for source in mapping.identity.contact_order:
        if source == CONTACT_ID:
            continue
        if source == "userId":
            found = event.userId or user_id
        elif source == "anonymousId":
            found = event.anonymousId
        elif "." in source:
            found = _at(event, source)
        else:
            found = next((v for b in bags if (v := id_value(b.get(source)))), None)
        if found:
            return str(found), source
    return None


def learned_contact(event: events.AnyEvent, mapping: Mapping, contact: str | None) -> Known:
    """The contact an identify teaches, with its source (`contact`: its own contact id,
    if any): by the order, except a bare userId or anonymousId, which every later event
    carries anyway (the first one sent is kept then)."""
    if not isinstance(event, events.Identify):
        return Known()
    if contact is not None:
        return Known(contact=contact, source=CONTACT_ID)
    found = fallback_contact(event, mapping)
    if found is None or found[0] in (event.userId, event.anonymousId):
        return Known()
    return Known(contact=found[0], source=found[1])


def identity_keys(event: events.AnyEvent) -> list[str]:
    """Identity-map keys an event teaches: its userId and its anonymousId."""
    keys = []
    if event.userId is not None:
        keys.append("u:" + event.userId)
    if event.anonymousId is not None:
        keys.append("a:" + event.anonymousId)
    return keys


def resolve_key(event: events.AnyEvent) -> str | None:
    """The one identity-map key an event is resolved by: its userId when it has one,
    never the anonymousId then (on a shared browser that is someone else's)."""
    if event.userId is not None:
        return "u:" + event.userId
    if event.anonymousId is not None:
        return "a:" + event.anonymousId
    return None


def resolve_raw_key(raw: Any) -> str | None:
    """`resolve_key` of a stored (normalised) event dict, without parsing it."""
    if not isinstance(raw, dict):
        return None
    for field, prefix in (("userId", "u:"), ("anonymousId", "a:")):
        value = raw.get(field)
        if isinstance(value, str) and value:
            return prefix + value
    return None


def alias_keys(event: events.Alias) -> list[str]:
    """The keys an alias links to its userId: the previous id as a userId and as an
    anonymousId (Segment's previousId is either)."""
    if event.previousId is None:
        return []
    return ["u:" + event.previousId, "a:" + event.previousId]
