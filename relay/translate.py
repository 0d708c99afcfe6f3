"""Segment events into ChurnZero commands, one call at a time: pure functions, no I/O.

identify -> `setAttribute` commands (contact, or account for traits the mapping puts
there; nothing reaches the account unless the mapping says so),
group -> `setAttribute` on the account `groupId` for its traits (the `[group]` mapping),
track -> one `trackEvent` (or the increment the mapping makes of it),
alias -> nothing sent, a link in the identity map.
Who each event is about (its `Ids`) is decided before, for the whole batch, by
relay.plan; this module only says what a call tells ChurnZero about them. A trait that is
not sent, or a value replaced, is counted in `dropped` by reason (the
`relay_skipped_attributes_total` labels): `blank_name`, `nested_object`, `null_value`,
`reserved_trait`, `quantity_not_a_number`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from relay import clock, events
from relay.commands import (
    MAX_DESCRIPTION,
    Command,
    IncrementAttribute,
    SetAttribute,
    TrackEvent,
)
from relay.mapping import Mapping
from relay.reasons import Skip
from relay.resolution import ID_KEYS, Ids

_FLAGS = ("ChurnZero", "Churnzero")


def skip_reason(event: events.AnyEvent, source: str, mapping: Mapping) -> Skip | None:
    """Why this event is not delivered (None: it is), as a metric label."""
    if event.type not in events.DELIVERED_TYPES:
        return Skip.UNSUPPORTED_TYPE
    if event.type == "delete" and source == "api":
        # Ingest refuses them; one queued by an earlier version must not erase a user.
        return Skip.DELETE_REFUSED
    integrations = event.integrations
    if integrations:
        # A null flag is no flag (analytics-next reads it as absent).
        flags = [flag for k in _FLAGS if (flag := integrations.get(k)) is not None]
        if any(flag is False for flag in flags):
            return Skip.DISABLED_BY_INTEGRATIONS
        # `All: false` is Segment's router's business; on /webhook Segment already routed
        # the event to us, so only the tracking API (where we stand in for the router)
        # applies it.
        if source == "api" and integrations.get("All") is False and not flags:
            return Skip.DISABLED_BY_INTEGRATIONS
    if isinstance(event, events.Track) and not mapping.event_wanted(event.event):
        return Skip.FILTERED_BY_MAPPING
    return None


def attribute_value(value: Any) -> bool | int | float | str | None:
    """A trait value as ChurnZero takes it, or None when it cannot be sent."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        scalars = [str(v) for v in value if isinstance(v, bool | int | float | str)]
        return ", ".join(scalars)
    return None  # nested objects and nulls


def unsendable(value: Any) -> str:
    """Why a value `attribute_value` refused is not sent, as a counter label."""
    return "null_value" if value is None else "nested_object"


def _set(ids: Ids, entity: str, name: str, value: bool | int | float | str) -> SetAttribute:
    return SetAttribute(
        account=ids.account, contact=ids.contact, entity=entity, name=name, value=value
    )


def identify_traits(
    traits: dict[str, Any], mapping: Mapping, dropped: Counter[str]
) -> list[tuple[str, str, bool | int | float | str]]:
    """(entity, attribute, value) for every sendable trait of an identify; what is not
    sent is counted in `dropped` by reason."""
    out: list[tuple[str, str, bool | int | float | str]] = []
    for trait, raw in traits.items():
        if trait in ID_KEYS:
            continue
        if trait == "company" and isinstance(raw, dict):
            name = raw.get("name")
            if mapping.traits.account_name_from_company and isinstance(name, str) and name:
                out.append(("account", "Name", name))
            continue
        if not trait.strip():
            dropped["blank_name"] += 1
            continue
        if not mapping.trait_wanted(trait):
            if mapping.trait_reserved(trait):
                dropped["reserved_trait"] += 1
            continue
        value = attribute_value(raw)
        if value is None:
            dropped[unsendable(raw)] += 1
            continue
        attribute = mapping.attribute_name(trait)
        if not attribute.strip():
            dropped["blank_name"] += 1
            continue
        out.append(("account" if trait in mapping.traits.account else "contact", attribute, value))
    return out


def identify_commands(
    event: events.Identify, ids: Ids, mapping: Mapping, dropped: Counter[str]
) -> list[Command]:
    """setAttribute commands for every sendable trait."""
    return [
        _set(ids, entity, name, value)
        for entity, name, value in identify_traits(event.traits, mapping, dropped)
    ]


_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")


def _quantity(props: dict[str, Any], dropped: Counter[str]) -> int | float:
    """`properties.quantity` as a number (a numeric string too); else 1, counted when
    a value that is no number was given."""
    quantity = props.get("quantity")
    if quantity is None:
        return 1
    if isinstance(quantity, int | float) and not isinstance(quantity, bool):
        if math.isfinite(quantity):
            return quantity
    elif isinstance(quantity, str) and _NUMBER.fullmatch(quantity):
        number = float(quantity)
        if math.isfinite(number):
            return int(number) if number.is_integer() and "." not in quantity else number
    dropped["quantity_not_a_number"] += 1
    return 1


def _allow_dupes(event: events.Track) -> bool | None:
    if not event.integrations:
        return None
    for key in ("ChurnZero", "Churnzero"):
        options = event.integrations.get(key)
        if isinstance(options, dict) and isinstance(options.get("allowDupes"), bool):
            return bool(options["allowDupes"])
    return None


def track_commands(
    event: events.Track, ids: Ids, mapping: Mapping, dropped: Counter[str]
) -> list[Command]:
    """A track call's commands: its trackEvent, or the increment the mapping makes of it
    (with the trackEvent too when the mapping asks)."""
    quantity = _quantity(event.properties, dropped)
    increment = mapping.events.increment.get(event.event)
    if increment is None:
        return [track_command(event, ids, mapping, quantity)]
    command = IncrementAttribute(
        account=ids.account,
        contact=ids.contact,
        entity=increment.entity,
        name=increment.attribute,
        value=quantity,
    )
    if increment.track:
        return [command, track_command(event, ids, mapping, quantity)]
    return [command]


def utf16_cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-16 code units (ChurnZero's count), never inside
    a surrogate pair."""
    if len(text) <= limit // 2 or len(text.encode("utf-16-le")) <= 2 * limit:
        return text
    units = 0
    for n, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return text[:n]
    return text


def track_command(
    event: events.Track, ids: Ids, mapping: Mapping, quantity: int | float = 1
) -> TrackEvent:
    """The trackEvent command of a track call."""
    stamp = event.timestamp
    props = event.properties
    text = props.get("description")
    custom: dict[str, Any] = {}
    for name in mapping.custom_fields(event.event):
        value = attribute_value(props.get(name))
        if value is not None:
            custom[name] = value
    return TrackEvent(
        account=ids.account,
        contact=ids.contact,
        event_name=mapping.event_name(event.event),
        event_date=clock.iso(stamp) if stamp else None,
        description=(utf16_cut(text, MAX_DESCRIPTION) or None) if isinstance(text, str) else None,
        quantity=quantity,
        allow_dupes=_allow_dupes(event),
        custom=custom,
    )


def group_commands(
    event: events.Group, ids: Ids, mapping: Mapping, dropped: Counter[str]
) -> list[Command]:
    """setAttribute commands on the account for the group traits the mapping sends."""
    out: list[Command] = []
    for trait, raw in event.traits.items():
        if trait in ID_KEYS:
            continue
        if not trait.strip():
            dropped["blank_name"] += 1
            continue
        name = mapping.group.attribute(trait)
        if name is None:
            if mapping.group.reserved(trait):
                dropped["reserved_trait"] += 1
            continue
        value = attribute_value(raw)
        if value is None:
            dropped[unsendable(raw)] += 1
        elif not name.strip():
            dropped["blank_name"] += 1
        else:
            out.append(_set(ids, "account", name, value))
    return out


def commands(
    event: events.AnyEvent, ids: Ids, mapping: Mapping, dropped: Counter[str] | None = None
) -> list[Command]:
    """The commands of an identify, group or track call about `ids`; what is not sent is
    counted in `dropped` by reason."""
    dropped = Counter() if dropped is None else dropped
    if isinstance(event, events.Identify):
        return identify_commands(event, ids, mapping, dropped)
    if isinstance(event, events.Group):
        return group_commands(event, ids, mapping, dropped)
    assert isinstance(event, events.Track)
    return track_commands(event, ids, mapping, dropped)
