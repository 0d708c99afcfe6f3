"""Segment events into ChurnZero commands: pure functions, no I/O.

identify -> `setAttribute` commands (contact, or account for traits the mapping puts
there; nothing reaches the account unless the mapping says so),
track -> one `trackEvent`. Identity (account and contact external ids) comes from the
event itself or, through the identity map, from an earlier identify; `plan_batch`
works a whole Celery batch at once so a track resolves against an identify anywhere
in the same batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from relay import events
from relay.mapping import Mapping

Command = dict[str, Any]

ACCOUNT_KEYS = ("accountExternalId", "accountExternalID")
CONTACT_KEYS = ("contactExternalId", "contactExternalID")
_ID_KEYS = frozenset(ACCOUNT_KEYS + CONTACT_KEYS)
MAX_ID = 100
MAX_DESCRIPTION = 255


@dataclass(frozen=True)
class Ids:
    """A ChurnZero account and contact, by their external ids."""

    account: str
    contact: str


def _lookup(source: Any, path: str) -> Any:
    if not path:
        return source
    for part in path.split("."):
        if not isinstance(source, dict):
            return None
        source = source.get(part)
    return source


def _id_value(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | str):
        text = str(value).strip()
        return text or None
    return None


def _first_id(
    bags: Iterable[dict[str, Any]],
    keys: tuple[str, ...],
    event: events.AnyEvent,
    paths: Iterable[str],
) -> str | None:
    for bag in bags:
        for key in keys:
            found = _id_value(bag.get(key))
            if found:
                return found
    for path in paths:
        head, _, rest = path.partition(".")
        found = _id_value(_lookup(getattr(event, head, None), rest))
        if found:
            return found
    return None


def explicit_ids(event: events.AnyEvent, mapping: Mapping) -> tuple[str | None, str | None]:
    """The account and contact ids the event itself carries (either may be missing)."""
    own = event.traits if isinstance(event, events.Identify) else getattr(event, "properties", {})
    context_traits = event.context.get("traits")
    bags = [own] + ([context_traits] if isinstance(context_traits, dict) else [])
    account = _first_id(bags, ACCOUNT_KEYS, event, mapping.identity.account_paths)
    contact = _first_id(bags, CONTACT_KEYS, event, mapping.identity.contact_paths)
    return account, contact


def identity_keys(event: events.AnyEvent) -> list[str]:
    """Identity-map keys an identify with ids teaches: its userId and its anonymousId."""
    keys = []
    if event.userId is not None:
        keys.append("u:" + event.userId)
    if event.anonymousId is not None:
        keys.append("a:" + event.anonymousId)
    return keys


def resolve_key(event: events.AnyEvent) -> str | None:
    """The one identity-map key an event without ids is resolved by: its userId when it
    has one, never the anonymousId then (on a shared browser that is someone else's)."""
    if event.userId is not None:
        return "u:" + event.userId
    if event.anonymousId is not None:
        return "a:" + event.anonymousId
    return None


def skip_reason(event: events.AnyEvent, source: str, mapping: Mapping) -> str | None:
    """Why this event is not delivered (None: it is), as a metric label."""
    if event.type not in events.DELIVERED_TYPES:
        return "unsupported_type"
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


def attribute_value(value: Any) -> Any:
    """A trait value as ChurnZero takes it, or None when it cannot be sent."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        scalars = [str(v) for v in value if isinstance(v, bool | int | float | str)]
        return ", ".join(scalars)
    return None  # nested objects and nulls


def _base(ids: Ids, action: str) -> Command:
    return {"accountExternalId": ids.account, "contactExternalId": ids.contact, "action": action}


def _set(ids: Ids, entity: str, name: str, value: Any) -> Command:
    return {**_base(ids, "setAttribute"), "entity": entity, "name": name, "value": value}


def identify_commands(event: events.Identify, ids: Ids, mapping: Mapping) -> list[Command]:
    """setAttribute commands for every sendable trait."""
    out = []
    for trait, raw in event.traits.items():
        if trait in _ID_KEYS:
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


def track_command(event: events.Track, ids: Ids, mapping: Mapping) -> Command:
    """The trackEvent command of a track call."""
    stamp = event.timestamp
    command = {
        **_base(ids, "trackEvent"),
        "eventName": mapping.event_name(event.event),
        "eventDate": stamp.isoformat().replace("+00:00", "Z") if stamp else None,
    }
    props = event.properties
    description = props.get("description")
    if isinstance(description, str) and description:
        command["description"] = description[:MAX_DESCRIPTION]
    quantity = props.get("quantity")
    numeric = isinstance(quantity, int | float) and not isinstance(quantity, bool)
    command["quantity"] = quantity if numeric else 1
    for name in mapping.custom_fields(event.event):
        value = attribute_value(props.get(name))
        if value is not None:
            command[f"cf_{name}"] = value
    return command


def validate_command(command: Command) -> list[str]:
    """What is wrong with a command ChurnZero would silently swallow (empty: nothing)."""
    problems = []
    for key in ("accountExternalId", "contactExternalId"):
        value = command.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{key} is empty")
        elif len(value) > MAX_ID:
            problems.append(f"{key} is longer than {MAX_ID} characters")
    if command.get("action") == "trackEvent":
        name = command.get("eventName")
        if not isinstance(name, str) or not name.strip():
            problems.append("eventName is empty")
        if not command.get("eventDate"):
            problems.append("eventDate is missing")
        if len(str(command.get("description", ""))) > MAX_DESCRIPTION:
            problems.append(f"description is longer than {MAX_DESCRIPTION} characters")
    elif command.get("action") == "setAttribute":
        if not str(command.get("name", "")).strip():
            problems.append("attribute name is empty")
        if command.get("entity") not in ("account", "contact"):
            problems.append("entity must be account or contact")
    return problems


@dataclass
class Plan:
    """What to do with each item of a batch (an item wraps one event with its metadata)."""

    send: list[tuple[dict[str, Any], list[Command]]] = field(default_factory=list)
    skipped: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    invalid_event: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    invalid_command: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    # Held by the new-name guard (relay.names), with the names: never planned here.
    held: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    learned: dict[str, Ids] = field(default_factory=dict)


def parse_items(
    items: list[dict[str, Any]],
) -> tuple[list[tuple[dict[str, Any], events.AnyEvent]], list[tuple[dict[str, Any], list[str]]]]:
    """Each item's event parsed; items whose event no longer parses, with why."""
    good, bad = [], []
    for item in items:
        try:
            good.append((item, events.parse(item["event"])))
        except (ValidationError, KeyError, TypeError, AttributeError) as exc:
            bad.append((item, [str(exc).splitlines()[0]]))
    return good, bad


def lookup_keys(
    parsed: list[tuple[dict[str, Any], events.AnyEvent]], mapping: Mapping
) -> list[str]:
    """Identity-map keys to fetch before planning: those of events without both ids."""
    keys: set[str] = set()
    for _, event in parsed:
        if event.type in events.DELIVERED_TYPES and None in explicit_ids(event, mapping):
            key = resolve_key(event)
            if key is not None:
                keys.add(key)
    return sorted(keys)


def plan_batch(
    parsed: list[tuple[dict[str, Any], events.AnyEvent]],
    known: AbstractMapping[str, Ids],
    mapping: Mapping,
) -> Plan:
    """Decide every item's fate: commands to send, skip, wait for identity, or invalid."""
    plan = Plan()
    wanted: list[tuple[dict[str, Any], events.AnyEvent, tuple[str | None, str | None]]] = []
    for item, event in parsed:
        reason = skip_reason(event, item.get("source", "api"), mapping)
        if reason:
            plan.skipped.append((item, reason))
            continue
        ids = explicit_ids(event, mapping)
        wanted.append((item, event, ids))
        if isinstance(event, events.Identify) and None not in ids:
            for key in identity_keys(event):
                plan.learned[key] = Ids(ids[0], ids[1])  # type: ignore[arg-type]  # checked
    # In batch order, an event is resolved by what was known when it happened: an identify
    # earlier in the batch, else the identity map; only a user nobody knew yet borrows
    # the batch's later identify (a track that raced ahead of its identify).
    so_far: dict[str, Ids] = {}
    for item, event, (account, contact) in wanted:
        if isinstance(event, events.Identify) and account is not None and contact is not None:
            so_far.update({key: Ids(account, contact) for key in identity_keys(event)})
        if account is None or contact is None:
            key = resolve_key(event) or ""
            found = so_far.get(key) or known.get(key) or plan.learned.get(key)
            if found is None:
                plan.unresolved.append(item)
                continue
            account, contact = account or found.account, contact or found.contact
        resolved = Ids(account, contact)
        if isinstance(event, events.Identify):
            commands = identify_commands(event, resolved, mapping)
        else:
            assert isinstance(event, events.Track)
            commands = [track_command(event, resolved, mapping)]
        problems = [p for c in commands for p in validate_command(c)]
        if problems:
            plan.invalid_command.append((item, sorted(set(problems))))
        elif commands:
            plan.send.append((item, commands))
        else:
            plan.skipped.append((item, "nothing_to_send"))
    return plan
