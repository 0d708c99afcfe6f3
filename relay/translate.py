"""Segment events into ChurnZero commands, one call at a time: pure functions, no I/O.

identify -> `setAttribute` commands (contact, or account for traits the mapping puts
there; nothing reaches the account unless the mapping says so),
group -> `setAttribute` on the account `groupId` for its traits (the `[group]` mapping),
track -> one `trackEvent` (or the increment the mapping makes of it),
alias -> nothing sent, a link in the identity map.
Who each event is about (its `Ids`) is decided before, for the whole batch, by
relay.plan; this module only says what a call tells ChurnZero about them.
"""

from __future__ import annotations

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
from relay.resolution import ID_KEYS, Ids


def skip_reason(event: events.AnyEvent, source: str, mapping: Mapping) -> str | None:
    """Why this event is not delivered (None: it is), as a metric label."""
    if event.type not in events.DELIVERED_TYPES:
        return "unsupported_type"
    if event.type == "delete" and source == "api":
        # Ingest refuses them; one queued by an earlier version must not erase a user.
        return "delete_refused"
    flags = [event.integrations[k] for k in ("ChurnZero", "Churnzero") if k in event.integrations]
    if any(flag is False for flag in flags):
        return "disabled_by_integrations"
    # `All: false` is Segment's router's business; on /webhook Segment already routed the
    # event to us, so only the tracking API (where we stand in for the router) applies it.
    if source == "api" and event.integrations.get("All") is False and not flags:
        return "disabled_by_integrations"
    if isinstance(event, events.Track) and not mapping.event_wanted(event.event):
        return "filtered_by_mapping"
    return None


def attribute_value(value: Any) -> bool | int | float | str | None:
    """A trait value as ChurnZero takes it, or None when it cannot be sent."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        scalars = [str(v) for v in value if isinstance(v, bool | int | float | str)]
        return ", ".join(scalars)
    return None  # nested objects and nulls


def _set(ids: Ids, entity: str, name: str, value: bool | int | float | str) -> SetAttribute:
    return SetAttribute(
        account=ids.account, contact=ids.contact, entity=entity, name=name, value=value
    )


def identify_commands(event: events.Identify, ids: Ids, mapping: Mapping) -> list[Command]:
    """setAttribute commands for every sendable trait."""
    out: list[Command] = []
    for trait, raw in event.traits.items():
        if trait in ID_KEYS:
            continue
        if trait == "company" and isinstance(raw, dict):
            name = raw.get("name")
            if mapping.traits.account_name_from_company and isinstance(name, str) and name:
                out.append(_set(ids, "account", "Name", name))
            continue
        if not mapping.trait_wanted(trait):
            continue
        value = attribute_value(raw)
        if value is None:
            continue
        entity = "account" if trait in mapping.traits.account else "contact"
        out.append(_set(ids, entity, mapping.attribute_name(trait), value))
    return out


def _quantity(props: dict[str, Any]) -> int | float:
    quantity = props.get("quantity")
    if isinstance(quantity, int | float) and not isinstance(quantity, bool):
        return quantity
    return 1


def _allow_dupes(event: events.Track) -> bool | None:
    for key in ("ChurnZero", "Churnzero"):
        options = event.integrations.get(key)
        if isinstance(options, dict) and isinstance(options.get("allowDupes"), bool):
            return bool(options["allowDupes"])
    return None


def track_commands(event: events.Track, ids: Ids, mapping: Mapping) -> list[Command]:
    """A track call's commands: its trackEvent, or the increment the mapping makes of it
    (with the trackEvent too when the mapping asks)."""
    increment = mapping.events.increment.get(event.event)
    if increment is None:
        return [track_command(event, ids, mapping)]
    command = IncrementAttribute(
        account=ids.account,
        contact=ids.contact,
        entity=increment.entity,
        name=increment.attribute,
        value=_quantity(event.properties),
    )
    return [command, track_command(event, ids, mapping)] if increment.track else [command]


def track_command(event: events.Track, ids: Ids, mapping: Mapping) -> TrackEvent:
    """The trackEvent command of a track call."""
    stamp = event.timestamp
    props = event.properties
    text = props.get("description")
    fields = {name: attribute_value(props.get(name)) for name in mapping.custom_fields(event.event)}
    return TrackEvent(
        account=ids.account,
        contact=ids.contact,
        event_name=mapping.event_name(event.event),
        event_date=clock.iso(stamp) if stamp else None,
        description=(text[:MAX_DESCRIPTION] or None) if isinstance(text, str) else None,
        quantity=_quantity(props),
        allow_dupes=_allow_dupes(event),
        custom={name: value for name, value in fields.items() if value is not None},
    )


def group_commands(event: events.Group, ids: Ids, mapping: Mapping) -> list[Command]:
    """setAttribute commands on the account for the group traits the mapping sends."""
    out: list[Command] = []
    for trait, raw in event.traits.items():
        name = mapping.group.attribute(trait) if trait not in ID_KEYS else None
        value = attribute_value(raw) if name else None
        if name and value is not None:
            out.append(_set(ids, "account", name, value))
    return out


def commands(event: events.AnyEvent, ids: Ids, mapping: Mapping) -> list[Command]:
    """The commands of an identify, group or track call about `ids`."""
    if isinstance(event, events.Identify):
        return identify_commands(event, ids, mapping)
    if isinstance(event, events.Group):
        return group_commands(event, ids, mapping)
    assert isinstance(event, events.Track)
    return track_commands(event, ids, mapping)
