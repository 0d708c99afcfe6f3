"""relay.translate: Segment events (parsed by relay.ingest.parsing) into ChurnZero commands.

Table-driven: each case is the events of one batch as a client sends them, and the fate
of every item exactly (the commands sent, or why it is not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from relay.commands import Command, IncrementAttribute, SetAttribute, TrackEvent
from relay.envelope import Envelope
from relay.ingest.parsing import parse_api, parse_webhook
from relay.mapping import EventMap, GroupMap, IdentityMap, Increment, Mapping, TraitMap
from relay.parked import release_items
from relay.plan import lookup_keys, parse_items, plan_batch
from relay.resolution import Ids, Known
from tests.conftest import fixture

RECEIVED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
WHEN = "2024-03-19T07:22:00Z"
ENGAGE = "engage-audience-identify-as-delivered.json"
ACCOUNT, CONTACT = "12345678", "john.smith@company.com"
IDS = {"accountExternalId": ACCOUNT, "contactExternalId": CONTACT}


def items_of(events: list[Any], source: str) -> list[Envelope]:
    """Queued envelopes built through the real ingest parsing (fixture names are loaded)."""
    raw = [fixture(e) if isinstance(e, str) else e for e in events]
    if source == "webhook":
        body = json.dumps(raw[0] if len(raw) == 1 else raw).encode()
        parsed = parse_webhook(body, RECEIVED, signed=True)
    else:
        parsed = parse_api("batch", json.dumps({"batch": raw}).encode(), RECEIVED)
    assert parsed.rejected == []
    return [
        Envelope.new(event, source=source, received_at=0.0, rid=f"r{n}")
        for n, event in enumerate(parsed.accepted)
    ]


def fates(
    events: list[Any],
    *,
    source: str = "api",
    known: dict[str, Known] | None = None,
    mapping: Mapping | None = None,
    links: dict[str, str] | None = None,
    deleted: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every item's fate: its commands, ("skipped", reason), "unresolved" or invalid."""
    parsed, bad = parse_items(items_of(events, source))
    assert bad == []
    plan = plan_batch(parsed, known or {}, mapping or Mapping(), links, deleted)
    out: dict[str, Any] = {}
    for item, commands in plan.send:
        out[item.id] = [c.to_dict() for c in commands]  # the JSON ChurnZero receives
    for item, reason in plan.skipped:
        out[item.id] = ("skipped", reason)
    for item in plan.unresolved:
        out[item.id] = "unresolved"
    for item in plan.no_contact:
        out[item.id] = "no_contact"
    for item, problems in plan.invalid_command:
        out[item.id] = ("invalid_command", problems)
    for item, problems in plan.invalid_event:
        out[item.id] = ("invalid_event", problems)
    assert len(out) == len(parsed), "every item has exactly one fate"
    return out


def track(event: str = "Clicked Login Button", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "userId123", "event": event, "timestamp": WHEN, **extra}


def group(group_id: str | None, traits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "group", "userId": "userId123", "groupId": group_id, "traits": traits,
            **extra}  # fmt: skip


def identify(traits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": "userId123", "traits": traits, **extra}


def track_event(
    name: str = "Clicked Login Button",
    *,
    account: str = ACCOUNT,
    contact: str = CONTACT,
    date: str = WHEN,
    quantity: Any = 1,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "accountExternalId": account,
        "contactExternalId": contact,
        "action": "trackEvent",
        "eventName": name,
        "eventDate": date,
        "quantity": quantity,
        **extra,
    }


def set_attr(
    name: str, value: Any, entity: str = "contact", account: str = ACCOUNT, contact: str = CONTACT
) -> dict[str, Any]:
    return {
        "accountExternalId": account,
        "contactExternalId": contact,
        "action": "setAttribute",
        "entity": entity,
        "name": name,
        "value": value,
    }


@dataclass
class Case:
    events: list[Any]
    expected: dict[str, Any]
    source: str = "api"
    known: dict[str, Known] = field(default_factory=dict)
    mapping: Mapping = field(default_factory=Mapping)
    links: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)


KNOWN = {"u:userId123": Known(ACCOUNT, CONTACT)}
ENGAGE_KNOWN = {"u:<USER ID>": Known("acct-1", "dpease+test@drift.com")}
NOTHING = ("skipped", "nothing_to_send")
DISABLED = ("skipped", "disabled_by_integrations")
UNSUPPORTED = ("skipped", "unsupported_type")
FILTERED = ("skipped", "filtered_by_mapping")
LONG_ID = "x" * 101

CASES = {
    # --- identity -------------------------------------------------------------------
    "seed-identify-then-track-one-batch": Case(
        [identify(IDS), track()],
        {"r0": NOTHING, "r1": [track_event()]},
    ),
    "track-before-identify-one-batch": Case(
        [track(), identify({**IDS, "firstName": "John"})],
        {"r0": [track_event()], "r1": [set_attr("FirstName", "John")]},
    ),
    "anonymous-identify-resolves-anonymous-track": Case(
        [
            {"type": "identify", "anonymousId": "anon-1", "traits": IDS},
            {"type": "track", "anonymousId": "anon-1", "event": "Viewed", "timestamp": WHEN},
        ],
        {"r0": NOTHING, "r1": [track_event("Viewed")]},
    ),
    "ids-on-the-track-itself": Case([track(properties=IDS)], {"r0": [track_event()]}),
    "ID-spelling": Case(
        [track(properties={"accountExternalID": ACCOUNT, "contactExternalID": CONTACT})],
        {"r0": [track_event()]},
    ),
    "numeric-account-id": Case(
        [track(properties={"accountExternalId": 12345678, "contactExternalId": CONTACT})],
        {"r0": [track_event()]},
    ),
    "ids-from-context-traits-track": Case(
        [track(context={"traits": IDS})], {"r0": [track_event()]}
    ),
    "ids-from-context-traits-identify": Case(
        [identify({"plan": "pro"}, context={"traits": IDS})],
        {"r0": [set_attr("plan", "pro")]},
    ),
    "ids-from-context-traits-ID-spelling": Case(
        [track(context={"traits": {"accountExternalID": ACCOUNT, "contactExternalID": CONTACT}})],
        {"r0": [track_event()]},
    ),
    "ids-from-the-identity-map": Case([track()], {"r0": [track_event()]}, known=KNOWN),
    "one-explicit-id-the-other-known": Case(
        [track(properties={"contactExternalId": "jane@company.com"})],
        {"r0": [track_event(contact="jane@company.com")]},
        known=KNOWN,
    ),
    "batch-identify-beats-the-identity-map": Case(
        [identify({"accountExternalId": "99", "contactExternalId": "new@company.com"}), track()],
        {"r0": NOTHING, "r1": [track_event(account="99", contact="new@company.com")]},
        known=KNOWN,
    ),
    "unresolved-track": Case([track()], {"r0": "unresolved"}),
    "unresolved-track-other-user-known": Case(
        [track(userId="someone-else")], {"r0": "unresolved"}, known=KNOWN
    ),
    "identify-with-account-only-takes-userId-as-contact": Case(
        [identify({"accountExternalId": ACCOUNT}), track()],
        {"r0": NOTHING, "r1": [track_event(contact="userId123")]},
    ),
    "identify-without-account-parks-its-traits-a-track-waits": Case(
        [identify({"contactExternalId": CONTACT, "plan": "Pro"}), track()],
        {"r0": ("skipped", "parked"), "r1": "unresolved"},
    ),
    "identify-without-account-or-traits-waits": Case(
        [identify({"contactExternalId": CONTACT})], {"r0": "unresolved"}
    ),
    # --- group calls: accounts ------------------------------------------------------
    "group-then-tracks-land-on-the-group": Case(
        [group("g-1", {"plan": "Pro", "name": "Acme", "employees": 40}), track()],
        {
            "r0": [set_attr("plan", "Pro", "account", account="g-1", contact="userId123")],
            "r1": [track_event(account="g-1", contact="userId123")],
        },
    ),
    "group-keeps-the-known-contact": Case(
        [group("g-2", {}), track()],
        {"r0": NOTHING, "r1": [track_event(account="g-2")]},
        known={"u:userId123": Known(ACCOUNT, CONTACT)},
    ),
    "group-name-with-mapping-and-renames": Case(
        [group("g-1", {"name": "Acme", "plan": "Pro", "secret": "x"})],
        {
            "r0": [
                set_attr("Name", "Acme", "account", account="g-1", contact="userId123"),
                set_attr("Plan Name", "Pro", "account", account="g-1", contact="userId123"),
            ]
        },
        mapping=Mapping(
            group=GroupMap(name=True, rename={"plan": "Plan Name"}, ignore=frozenset({"secret"}))
        ),
    ),
    "group-without-groupId-is-counted": Case(
        [group(None, {})], {"r0": ("skipped", "missing_group_id")}
    ),
    "context-groupId-wins-for-its-event": Case(
        [group("g-1", {}), track(context={"groupId": "g-9"}), track()],
        {
            "r0": NOTHING,
            "r1": [track_event(account="g-9", contact="userId123")],
            "r2": [track_event(account="g-1", contact="userId123")],
        },
    ),
    "identify-email-is-the-contact-after-group": Case(
        [group("g-1", {}), identify({"email": "ann@acme.io"}), track()],
        {
            "r0": NOTHING,
            "r1": [set_attr("Email", "ann@acme.io", account="g-1", contact="ann@acme.io")],
            "r2": [track_event(account="g-1", contact="ann@acme.io")],
        },
    ),
    "a-known-contact-stays-when-an-email-arrives": Case(
        [identify({"email": "new@acme.io"}), track()],
        {"r0": [set_attr("Email", "new@acme.io")], "r1": [track_event()]},
        known=KNOWN,
    ),
    "the-first-contact-sent-is-kept-when-an-email-arrives": Case(
        [
            identify({"accountExternalId": "A2", "plan": "a"}),
            track(),
            identify({"email": "d2@x.io", "plan": "b"}),
            track(),
        ],
        {
            "r0": [set_attr("plan", "a", account="A2", contact="userId123")],
            "r1": [track_event(account="A2", contact="userId123")],
            "r2": [
                set_attr("Email", "d2@x.io", account="A2", contact="userId123"),
                set_attr("plan", "b", account="A2", contact="userId123"),
            ],
            "r3": [track_event(account="A2", contact="userId123")],
        },
    ),
    "group-track-identify-keeps-one-contact": Case(
        [group("g-1", {"plan": "p"}), track(), identify({"email": "d2@x.io"}), track()],
        {
            "r0": [set_attr("plan", "p", "account", account="g-1", contact="userId123")],
            "r1": [track_event(account="g-1", contact="userId123")],
            "r2": [set_attr("Email", "d2@x.io", account="g-1", contact="userId123")],
            "r3": [track_event(account="g-1", contact="userId123")],
        },
    ),
    "a-kept-contact-stays-when-an-email-arrives-in-a-later-batch": Case(
        [identify({"email": "d2@x.io"}), track()],
        {
            "r0": [set_attr("Email", "d2@x.io", account="A2", contact="userId123")],
            "r1": [track_event(account="A2", contact="userId123")],
        },
        known={"u:userId123": Known("A2", "userId123", None, "userId")},
    ),
    "an-explicit-contact-id-moves-the-user": Case(
        [identify({"contactExternalId": "c-new", "plan": "b"}), track()],
        {
            "r0": [set_attr("plan", "b", account="A2", contact="c-new")],
            "r1": [track_event(account="A2", contact="c-new")],
        },
        known={"u:userId123": Known("A2", "userId123", None, "userId")},
    ),
    "group-with-only-an-anonymous-id-has-no-contact": Case(
        [{"type": "group", "anonymousId": "job-1", "groupId": "g-9", "traits": {"mrr": 5}}],
        {"r0": "no_contact"},
    ),
    "group-with-only-an-anonymous-id-uses-the-account-contact": Case(
        [
            {"type": "group", "anonymousId": "job-1", "groupId": "g-9", "traits": {"mrr": 5}},
            {"type": "track", "anonymousId": "job-1", "event": "E", "timestamp": WHEN},
        ],
        {
            "r0": [set_attr("mrr", 5, "account", account="g-9", contact="account-sync")],
            "r1": "unresolved",
        },
        mapping=Mapping(identity=IdentityMap(account_contact="account-sync")),
    ),
    "contact-order-from-the-mapping": Case(
        [group("g-1", {}), track(properties={"login": "ann1", "contactExternalId": "c-7"})],
        {"r0": NOTHING, "r1": [track_event(account="g-1", contact="ann1")]},
        mapping=Mapping(identity=IdentityMap(contact_order=("login", "userId"))),
    ),
    "group-later-in-batch-resolves-a-new-user": Case(
        [track(), group("g-1", {})],
        {"r0": [track_event(account="g-1", contact="userId123")], "r1": NOTHING},
    ),
    "an-older-group-call-does-not-move-the-user-back": Case(
        [
            group("g-old", {}, timestamp="2024-03-19T07:21:00Z"),
            track(),
            group("g-newer", {}, timestamp="2024-03-19T07:23:00Z"),
            track(),
        ],
        {
            "r0": NOTHING,
            "r1": [track_event(account="g-new", contact="userId123")],
            "r2": NOTHING,
            "r3": [track_event(account="g-newer", contact="userId123")],
        },
        known={"u:userId123": Known("g-new", None, 1710832920000)},  # 07:22:00
    ),
    # --- alias ---------------------------------------------------------------------
    "alias-links-anonymous-tracks-to-the-user": Case(
        [
            {"type": "alias", "userId": "userId123", "previousId": "anon-1"},
            {"type": "track", "anonymousId": "anon-1", "event": "Viewed", "timestamp": WHEN},
        ],
        {"r0": NOTHING, "r1": [track_event("Viewed")]},
        known=KNOWN,
    ),
    "alias-carries-the-previous-ids-knowledge": Case(
        [
            {"type": "alias", "userId": "new-id", "previousId": "userId123"},
            {"type": "track", "userId": "new-id", "event": "Viewed", "timestamp": WHEN},
        ],
        {"r0": NOTHING, "r1": [track_event("Viewed")]},
        known=KNOWN,
    ),
    "alias-through-a-stored-link": Case(
        [track()],
        {"r0": [track_event(account="g-5", contact=CONTACT)]},
        known={"u:new-id": Known("g-5", CONTACT)},
        links={"u:userId123": "u:new-id"},
    ),
    "alias-gives-an-anonymous-visitor-the-users-contact": Case(
        [
            group("g-1", {}, userId="u-new"),
            {"type": "alias", "userId": "u-new", "previousId": "anon-7"},
            {"type": "track", "anonymousId": "anon-7", "event": "Viewed", "timestamp": WHEN},
        ],
        {
            "r0": NOTHING,
            "r1": NOTHING,
            "r2": [track_event("Viewed", account="g-1", contact="u-new")],
        },
    ),
    # --- increments and allowDupes ------------------------------------------------------
    "increment-replaces-the-track-by-quantity": Case(
        [track("Seat Added", properties={**IDS, "quantity": 3}), track("Report Run")],
        {
            "r0": [
                {
                    "accountExternalId": ACCOUNT,
                    "contactExternalId": CONTACT,
                    "action": "incrementAttribute",
                    "entity": "account",
                    "name": "Seats",
                    "value": 3,
                }
            ],
            "r1": [
                {
                    "accountExternalId": ACCOUNT,
                    "contactExternalId": CONTACT,
                    "action": "incrementAttribute",
                    "entity": "contact",
                    "name": "Reports Run",
                    "value": 1,
                },
                track_event("Report Run"),
            ],
        },
        known=KNOWN,
        mapping=Mapping(
            events=EventMap(
                increment={
                    "Seat Added": Increment(attribute="Seats", entity="account"),
                    "Report Run": Increment(attribute="Reports Run", track=True),
                }
            )
        ),
    ),
    "allowDupes-from-the-integrations-object": Case(
        [
            track(integrations={"ChurnZero": {"allowDupes": True}}),
            track(integrations={"Churnzero": {"allowDupes": False}}),
            track(integrations={"ChurnZero": {"allowDupes": "yes"}}),
        ],
        {
            "r0": [{**track_event(), "allowDupes": True}],
            "r1": [{**track_event(), "allowDupes": False}],
            "r2": [track_event()],
        },
        known=KNOWN,
    ),
    # --- delete ------------------------------------------------------------------------
    "delete-drops-the-users-earlier-events-and-knowledge": Case(
        [
            track(properties=IDS),
            {"type": "delete", "userId": "userId123"},
            track(),
            track(userId="someone-else", properties=IDS),
        ],
        {
            "r0": ("skipped", "user_deleted"),
            "r1": ("skipped", "delete_request"),
            "r2": "unresolved",
            "r3": [track_event()],
        },
        source="webhook",
        known=KNOWN,
    ),
    "a-stored-delete-drops-events-received-before-it": Case(
        [track(properties=IDS), track(properties=IDS, userId="other")],
        {"r0": ("skipped", "user_deleted"), "r1": [track_event()]},
        deleted={"u:userId123": 5.0},
    ),
    "events-received-after-a-delete-are-delivered": Case(
        [track(properties=IDS)], {"r0": [track_event()]}, deleted={"u:userId123": -1.0}
    ),
    "alias-without-previousId-is-counted": Case(
        [{"type": "alias", "userId": "u1"}], {"r0": ("skipped", "incomplete_alias")}
    ),
    # --- identify traits ------------------------------------------------------------
    "camel-case-renames": Case(
        [identify({**IDS, "firstName": "John", "lastName": "Smith", "email": "j@c.com"})],
        {
            "r0": [
                set_attr("FirstName", "John"),
                set_attr("LastName", "Smith"),
                set_attr("Email", "j@c.com"),
            ]
        },
    ),
    "snake-case-renames": Case(
        [identify({**IDS, "first_name": "John", "last_name": "Smith"})],
        {"r0": [set_attr("FirstName", "John"), set_attr("LastName", "Smith")]},
    ),
    "company-name-is-not-written-to-the-account-by-default": Case(
        [identify({**IDS, "company": {"name": "Initech"}, "plan": "pro"})],
        {"r0": [set_attr("plan", "pro")]},
    ),
    "company-name-is-the-account-name-when-the-mapping-says-so": Case(
        [identify({**IDS, "company": {"name": "Initech", "industry": "Software"}})],
        {"r0": [set_attr("Name", "Initech", entity="account")]},
        mapping=Mapping(traits=TraitMap(account_name_from_company=True)),
    ),
    "reserved-segment-traits-are-not-sent-unless-mapped": Case(
        [
            identify(
                {
                    **IDS,
                    "id": "u-1",
                    "avatar": "https://x/a.png",
                    "createdAt": WHEN,
                    "address": {"city": "Austin"},
                    "username": "jsmith",
                    "title": "CTO",
                    "website": "https://w",
                    "age": 40,
                }
            )
        ],
        {"r0": [set_attr("Created", WHEN), set_attr("title", "CTO")]},
        mapping=Mapping(traits=TraitMap(rename={"createdAt": "Created"})),
    ),
    "trait-allow-list-sends-only-those": Case(
        [identify({**IDS, "firstName": "John", "plan": "pro", "seats": 4, "avatar": "a"})],
        {"r0": [set_attr("plan", "pro"), set_attr("avatar", "a")]},
        mapping=Mapping(traits=TraitMap(allow=frozenset({"plan", "avatar"}))),
    ),
    "ignore-wins-over-allow": Case(
        [identify({**IDS, "plan": "pro", "secret": "s"})],
        {"r0": [set_attr("plan", "pro")]},
        mapping=Mapping(
            traits=TraitMap(allow=frozenset({"plan", "secret"}), ignore=frozenset({"secret"}))
        ),
    ),
    # --- one user, one identity: never another user's anonymousId -----------------------
    "unknown-user-never-borrows-a-shared-browsers-anonymous-id": Case(
        [track(userId="bob", anonymousId="shared-browser")],
        {"r0": "unresolved"},
        known={"a:shared-browser": Known("acct-alice", "alice@example.com")},
    ),
    "anonymous-only-track-still-resolves-by-anonymous-id": Case(
        [{"type": "track", "anonymousId": "shared-browser", "event": "Viewed", "timestamp": WHEN}],
        {"r0": [track_event("Viewed", account="acct-alice", contact="alice@example.com")]},
        known={"a:shared-browser": Known("acct-alice", "alice@example.com")},
    ),
    "later-identify-in-the-batch-does-not-re-attribute-earlier-tracks": Case(
        [
            track("Before"),
            identify({"accountExternalId": "acct-new", "contactExternalId": CONTACT}),
            track("After"),
        ],
        {
            "r0": [track_event("Before")],
            "r1": NOTHING,
            "r2": [track_event("After", account="acct-new")],
        },
        known=KNOWN,
    ),
    "later-identify-resolves-an-earlier-track-of-a-user-nobody-knew": Case(
        [track("Raced Ahead"), identify(IDS)],
        {"r0": [track_event("Raced Ahead")], "r1": NOTHING},
    ),
    "company-without-name-sends-nothing": Case(
        [identify({**IDS, "company": {"id": "c1"}})], {"r0": NOTHING}
    ),
    "value-shapes": Case(
        [
            identify(
                {
                    **IDS,
                    "address": {"city": "Austin"},
                    "roles": ["Admin", "Billing"],
                    "mixed": ["a", 1, True, {"x": 1}, None],
                    "admin": True,
                    "churned": False,
                    "seats": 12,
                    "mrr": 99.5,
                    "createdAt": "2024-01-01T00:00:00Z",
                    "nothing": None,
                }
            )
        ],
        {
            "r0": [
                set_attr("roles", "Admin, Billing"),
                set_attr("mixed", "a, 1, True"),
                set_attr("admin", True),
                set_attr("churned", False),
                set_attr("seats", 12),
                set_attr("mrr", 99.5),  # createdAt: a reserved Segment trait, not sent
            ]
        },
    ),
    "engage-audience-identify-via-webhook": Case(
        [ENGAGE],
        {
            "r0": [
                set_attr(
                    "eg_lcm_user_portal_roles_partial_access",
                    True,
                    account="acct-1",
                    contact="dpease+test@drift.com",
                ),
                set_attr(
                    "Email",
                    "dpease+test@drift.com",
                    account="acct-1",
                    contact="dpease+test@drift.com",
                ),
            ]
        },
        source="webhook",
        known=ENGAGE_KNOWN,
    ),
    # --- integrations object ----------------------------------------------------------
    "ChurnZero-false-api": Case([track(integrations={"ChurnZero": False})], {"r0": DISABLED}),
    "ChurnZero-false-webhook": Case(
        [track(integrations={"ChurnZero": False}, properties=IDS)],
        {"r0": DISABLED},
        source="webhook",
    ),
    "Churnzero-false-api": Case([track(integrations={"Churnzero": False})], {"r0": DISABLED}),
    "Churnzero-false-webhook": Case(
        [track(integrations={"Churnzero": False}, properties=IDS)],
        {"r0": DISABLED},
        source="webhook",
    ),
    "ChurnZero-false-beats-All-true": Case(
        [track(integrations={"All": True, "ChurnZero": False}, properties=IDS)],
        {"r0": DISABLED},
    ),
    "ChurnZero-false-on-identify": Case(
        [identify({**IDS, "plan": "pro"}, integrations={"ChurnZero": False})],
        {"r0": DISABLED},
    ),
    "ChurnZero-options-object-enables": Case(
        [track(integrations={"All": False, "ChurnZero": {"allowDupes": True}}, properties=IDS)],
        {"r0": [{**track_event(), "allowDupes": True}]},
    ),
    "ChurnZero-true-with-All-false": Case(
        [track(integrations={"All": False, "ChurnZero": True}, properties=IDS)],
        {"r0": [track_event()]},
    ),
    "All-false-api-skips": Case(
        [track(integrations={"All": False, "HubSpot": True}, properties=IDS)],
        {"r0": DISABLED},
    ),
    "All-false-webhook-delivers": Case(
        [track(integrations={"All": False, "HubSpot": True}, properties=IDS)],
        {"r0": [track_event()]},
        source="webhook",
    ),
    "engage-All-false-api-skips": Case([ENGAGE], {"r0": DISABLED}, known=ENGAGE_KNOWN),
    "other-destination-false-delivers": Case(
        [track(integrations={"Intercom": False, "All": True}, properties=IDS)],
        {"r0": [track_event()]},
    ),
    "lower-case-churnzero-is-another-destination": Case(
        [track(integrations={"churnzero": False}, properties=IDS)],
        {"r0": [track_event()]},
    ),
    # --- unsupported types ------------------------------------------------------------
    "page-screen-api": Case(
        [
            {"type": "page", "userId": "u1", "name": "Home"},
            {"type": "screen", "userId": "u1", "name": "Home"},
        ],
        {"r0": UNSUPPORTED, "r1": UNSUPPORTED},
    ),
    "group-ids-in-traits-are-not-sent": Case(
        [{"type": "group", "userId": "u1", "groupId": "g1", "traits": IDS}],
        {"r0": NOTHING},
    ),
    "delete-webhook": Case(
        [{"type": "delete", "userId": "u1"}],
        {"r0": ("skipped", "delete_request")},
        source="webhook",
    ),
    "unsupported-type-even-with-ChurnZero-false": Case(
        [{"type": "page", "userId": "u1", "integrations": {"ChurnZero": False}}],
        {"r0": UNSUPPORTED},
    ),
    # --- track fields -----------------------------------------------------------------
    "event-date-in-utc": Case(
        [track(properties=IDS, timestamp="2024-03-19T09:22:00.5+02:00")],
        {"r0": [track_event(date="2024-03-19T07:22:00.500000Z")]},
    ),
    "event-date-epoch-milliseconds": Case(
        [track(properties=IDS, timestamp=1257894000000)],
        {"r0": [track_event(date="2009-11-10T23:00:00Z")]},
    ),
    "event-date-from-receipt-when-missing": Case(
        [{"type": "track", "userId": "userId123", "event": "Clicked Login Button"}],
        {"r0": [track_event(date="2030-01-02T03:04:05Z")]},
        known=KNOWN,
    ),
    "description": Case(
        [track(properties={**IDS, "description": "from the header"})],
        {"r0": [track_event(description="from the header")]},
    ),
    "description-truncated-to-255": Case(
        [track(properties={**IDS, "description": "é" * 300})],
        {"r0": [track_event(description="é" * 255)]},
    ),
    "description-not-a-string-ignored": Case(
        [track(properties={**IDS, "description": {"text": "x"}})], {"r0": [track_event()]}
    ),
    "quantity-int": Case(
        [track(properties={**IDS, "quantity": 3})], {"r0": [track_event(quantity=3)]}
    ),
    "quantity-float": Case(
        [track(properties={**IDS, "quantity": 2.5})], {"r0": [track_event(quantity=2.5)]}
    ),
    "quantity-zero": Case(
        [track(properties={**IDS, "quantity": 0})], {"r0": [track_event(quantity=0)]}
    ),
    "quantity-numeric-string-is-a-number": Case(
        [track(properties={**IDS, "quantity": "3"}), track(properties={**IDS, "quantity": " 2.5"})],
        {"r0": [track_event(quantity=3)], "r1": [track_event(quantity=2.5)]},
    ),
    "quantity-text-is-1": Case(
        [track(properties={**IDS, "quantity": "lots"})], {"r0": [track_event(quantity=1)]}
    ),
    "group-reserved-traits-held-back": Case(
        [
            group(
                "g-1",
                {
                    "id": "g-1",
                    "email": "a@b.c",
                    "website": "w",
                    "createdAt": "2020",
                    "avatar": "x",
                    "description": "d",
                    "phone": "1",
                    "employees": 4,
                    "industry": "i",
                    "address": "a",
                    "plan": "Pro",
                },
            )
        ],
        {"r0": [set_attr("plan", "Pro", "account", account="g-1", contact="userId123")]},
    ),
    "group-reserved-traits-sent-when-named": Case(
        [group("g-1", {"employees": 4, "industry": "i", "phone": "1"})],
        {
            "r0": [
                set_attr("Employees", 4, "account", account="g-1", contact="userId123"),
                set_attr("industry", "i", "account", account="g-1", contact="userId123"),
            ],
        },
        mapping=Mapping(
            group=GroupMap(
                rename={"employees": "Employees"}, allow=frozenset({"employees", "industry"})
            )
        ),
    ),
    "blank-trait-key-dropped-rest-sent": Case(
        [identify({**IDS, "": "x", " ": "y", "plan": "pro"})],
        {"r0": [set_attr("plan", "pro")]},
    ),
    "null-integrations-flag-is-absent": Case(
        [track(integrations={"All": False, "ChurnZero": None}, properties=IDS)], {"r0": DISABLED}
    ),
    "integral-float-user-id-is-an-integer": Case(
        [track(userId=123.0)],
        {"r0": [track_event(contact="123")]},
        known={"u:123": Known(ACCOUNT)},
    ),
    "description-cut-at-255-utf16-units": Case(
        [track(properties={**IDS, "description": "a" + "😀" * 200})],
        {"r0": [track_event(description="a" + "😀" * 127)]},
    ),
    "quantity-bool-is-1": Case(
        [track(properties={**IDS, "quantity": True})], {"r0": [track_event(quantity=1)]}
    ),
    "quantity-null-is-1": Case(
        [track(properties={**IDS, "quantity": None})], {"r0": [track_event(quantity=1)]}
    ),
    "no-cf-fields-by-default": Case(
        [track("Order Completed", properties={**IDS, "revenue": 14.99, "plan": "pro"})],
        {"r0": [track_event("Order Completed")]},
    ),
    "cf-fields-listed-by-mapping": Case(
        [
            track(
                "Order Completed",
                properties={**IDS, "revenue": 14.99, "plan": "pro", "coupon": "X", "tags": ["a"]},
            ),
            track("Signed Up", properties={**IDS, "revenue": 1, "plan": "free"}),
        ],
        {
            "r0": [track_event("Order Completed", cf_revenue=14.99, cf_plan="pro", cf_tags="a")],
            "r1": [track_event("Signed Up", cf_plan="free")],
        },
        mapping=Mapping(
            events=EventMap(fields={"Order Completed": ("revenue", "tags"), "*": ("plan",)})
        ),
    ),
    "cf-field-listed-but-absent": Case(
        [track("Order Completed", properties=IDS)],
        {"r0": [track_event("Order Completed")]},
        mapping=Mapping(events=EventMap(fields={"Order Completed": ("revenue",)})),
    ),
    # --- mapping: events and traits ---------------------------------------------------
    "event-rename": Case(
        [track(properties=IDS)],
        {"r0": [track_event("Login")]},
        mapping=Mapping(events=EventMap(rename={"Clicked Login Button": "Login"})),
    ),
    "event-deny": Case(
        [track(properties=IDS), track("Heartbeat", properties=IDS)],
        {"r0": [track_event()], "r1": FILTERED},
        mapping=Mapping(events=EventMap(deny=frozenset({"Heartbeat"}))),
    ),
    "event-allow": Case(
        [track(properties=IDS), track("Heartbeat", properties=IDS)],
        {"r0": [track_event()], "r1": FILTERED},
        mapping=Mapping(events=EventMap(allow=frozenset({"Clicked Login Button"}))),
    ),
    "event-allow-does-not-filter-identify": Case(
        [identify({**IDS, "plan": "pro"})],
        {"r0": [set_attr("plan", "pro")]},
        mapping=Mapping(events=EventMap(allow=frozenset({"Clicked Login Button"}))),
    ),
    "trait-rename-account-and-ignore": Case(
        [identify({**IDS, "plan": "pro", "mrr": 99, "password": "hunter2", "email": "j@c.com"})],
        {
            "r0": [
                set_attr("Plan Name", "pro", entity="account"),
                set_attr("mrr", 99, entity="account"),
                set_attr("Email", "j@c.com"),
            ]
        },
        mapping=Mapping(
            traits=TraitMap(
                rename={"plan": "Plan Name"},
                account=frozenset({"plan", "mrr"}),
                ignore=frozenset({"password"}),
            )
        ),
    ),
    # --- command validation -----------------------------------------------------------
    "id-of-100-chars-is-fine": Case(
        [track(properties={"accountExternalId": "a" * 100, "contactExternalId": CONTACT})],
        {"r0": [track_event(account="a" * 100)]},
    ),
    "account-id-over-100-chars": Case(
        [track(properties={"accountExternalId": LONG_ID, "contactExternalId": CONTACT})],
        {"r0": ("invalid_command", ["accountExternalId is longer than 100 characters"])},
    ),
    "contact-id-over-100-chars-on-identify": Case(
        [identify({"accountExternalId": ACCOUNT, "contactExternalId": LONG_ID, "plan": "pro"})],
        {"r0": ("invalid_command", ["contactExternalId is longer than 100 characters"])},
    ),
    "blank-event-name": Case(
        [track("   ", properties=IDS)], {"r0": ("invalid_command", ["eventName is empty"])}
    ),
    "event-renamed-to-nothing": Case(
        [track(properties=IDS)],
        {"r0": ("invalid_command", ["eventName is empty"])},
        mapping=Mapping(events=EventMap(rename={"Clicked Login Button": ""})),
    ),
    "empty-id-from-identity-map-is-unknown": Case(
        [track()],
        {"r0": "unresolved"},
        known={"u:userId123": Known("", CONTACT)},
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_translation(case: Case) -> None:
    got = fates(
        case.events,
        source=case.source,
        known=case.known,
        mapping=case.mapping,
        links=case.links,
        deleted=case.deleted,
    )
    assert got == case.expected


def test_the_first_contact_sent_is_kept_for_the_user_and_a_move_is_recorded() -> None:
    batch = [group("g-1", {"plan": "p"}), identify({"contactExternalId": "c-9"})]
    parsed, _ = parse_items(items_of(batch, "api"))
    first = plan_batch(parsed[:1], {}, Mapping())
    kept = first.learned["u:userId123"]
    assert (kept.account, kept.contact, kept.source) == ("g-1", "userId123", "userId")
    assert first.contact_changes == []
    moved = plan_batch(parsed[1:], first.learned, Mapping())
    [change] = moved.contact_changes
    assert (change.user, change.before, change.after) == (
        "u:userId123", Ids("g-1", "userId123"), Ids("g-1", "c-9"))  # fmt: skip
    assert moved.learned["u:userId123"].source == "contactExternalId"


def test_the_account_contact_is_never_kept_for_the_user() -> None:
    event = {"type": "group", "anonymousId": "job-1", "groupId": "g-9", "traits": {"mrr": 5}}
    parsed, _ = parse_items(items_of([event], "api"))
    mapping = Mapping(identity=IdentityMap(account_contact="account-sync"))
    plan = plan_batch(parsed, {}, mapping)
    assert plan.learned == {"a:job-1": Known("g-9", None, plan.learned["a:job-1"].at)}


def test_parked_traits_keep_the_newest_value_and_are_released_when_the_user_is_known() -> None:
    engage = [
        identify({"plan": "b", "is_churn_risk": True}, timestamp="2024-03-19T07:23:00Z"),
        identify({"plan": "a", "seats": 3}, timestamp="2024-03-19T07:22:00Z"),
    ]
    parsed, _ = parse_items(items_of(engage, "webhook"))
    plan = plan_batch(parsed, {}, Mapping())
    assert [reason for _, reason in plan.skipped] == ["parked", "parked"]
    assert plan.park == {"u:userId123": {"plan": (1710832980000, "b"),
                                         "is_churn_risk": (1710832980000, True),
                                         "seats": (1710832920000, 3)}}  # fmt: skip
    assert plan.unpark == []
    # A later group call names the account: the user's parked traits go out.
    parsed, _ = parse_items(items_of([group("g-1", {})], "api"))
    stored = {"u:userId123": plan.park["u:userId123"]}
    assert plan_batch(parsed, {}, Mapping(), parked=stored).unpark == ["u:userId123"]
    # Another user's do not, nor those of a user still without an account.
    parsed, _ = parse_items(items_of([identify({"plan": "c"})], "api"))
    assert plan_batch(parsed, {}, Mapping(), parked=stored).unpark == []


def test_release_items_are_identifies_one_per_event_time() -> None:
    parked = {"plan": (1710832980000, "b"), "seats": (1710832920000, 3)}
    items = release_items("u:userId123", parked, now=5.0)
    assert [i.event for i in items] == [
        {"type": "identify", "userId": "userId123", "traits": {"seats": 3},
         "timestamp": "2024-03-19T07:22:00Z", "messageId": items[0].event["messageId"]},
        {"type": "identify", "userId": "userId123", "traits": {"plan": "b"},
         "timestamp": "2024-03-19T07:23:00Z", "messageId": items[1].event["messageId"]},
    ]  # fmt: skip
    assert items[0].id != items[1].id and items == release_items("u:userId123", parked, 5.0)
    parsed, _ = parse_items(items)
    plan = plan_batch(parsed, {"u:userId123": Known("g-1")}, Mapping())
    assert [[c.to_dict() for c in cmds] for _, cmds in plan.send] == [
        [set_attr("seats", 3, account="g-1", contact="userId123")],
        [set_attr("plan", "b", account="g-1", contact="userId123")],
    ]


def test_values_not_sent_are_counted_with_a_reason() -> None:
    batch = [
        identify({**IDS, "": "x", "nested": {"a": 1}, "gone": None, "avatar": "a", "ok": 1}),
        group("g-1", {"employees": 3, "address": {"city": "x"}}),
        track(properties={**IDS, "quantity": "lots"}),
    ]
    parsed, _ = parse_items(items_of(batch, "api"))
    plan = plan_batch(parsed, {}, Mapping())
    assert plan.attributes == {"blank_name": 1, "nested_object": 1, "null_value": 1,
                               "reserved_trait": 3, "quantity_not_a_number": 1}  # fmt: skip


def test_wrapper_integrations_reach_every_item_of_a_batch() -> None:
    body = {
        "batch": [track(properties=IDS), identify({**IDS, "plan": "pro"})],
        "integrations": {"ChurnZero": False},
    }
    parsed = parse_api("batch", json.dumps(body).encode(), RECEIVED)
    items = [
        Envelope.new(e, source="api", received_at=0.0, rid=f"r{n}")
        for n, e in enumerate(parsed.accepted)
    ]
    parsed, _ = parse_items(items)
    plan = plan_batch(parsed, {}, Mapping())
    assert [reason for _, reason in plan.skipped] == [
        "disabled_by_integrations",
        "disabled_by_integrations",
    ]


def untimed(learned: dict[str, Known]) -> dict[str, Known]:
    return {key: Known(k.account, k.contact) for key, k in learned.items()}


def test_seed_example_teaches_the_identity_map() -> None:
    parsed, _ = parse_items(items_of([identify(IDS), track()], "api"))
    plan = plan_batch(parsed, {}, Mapping())
    assert untimed(plan.learned) == {"u:userId123": Known(ACCOUNT, CONTACT)}
    assert plan.learned["u:userId123"].at == int(RECEIVED.timestamp() * 1000)


def test_anonymous_only_fixture_teaches_its_anonymous_id() -> None:
    event = fixture("identify-anonymous-only-as-delivered.json")
    event["traits"].update(IDS)
    parsed, _ = parse_items(items_of([event], "webhook"))
    plan = plan_batch(parsed, {}, Mapping())
    assert untimed(plan.learned) == {"a:hhamed": Known(ACCOUNT, CONTACT)}
    [(_, commands)] = plan.send
    assert [c.to_dict() for c in commands] == [
        set_attr("chelsey_test", True),
        set_attr("contactId", "hhamed"),
    ]


def test_a_delete_forgets_the_user_and_what_the_batch_taught_before_it() -> None:
    batch = [
        identify(IDS),
        {"type": "alias", "userId": "userId123", "previousId": "old"},
        {"type": "delete", "userId": "userId123", "anonymousId": "anon-1"},
        {"type": "group", "userId": "userId123", "groupId": "g-after"},
    ]
    parsed, _ = parse_items(items_of(batch, "webhook"))
    plan = plan_batch(parsed, {}, Mapping())
    assert plan.forgotten == {"u:userId123": 0.0, "a:anon-1": 0.0}
    assert plan.links == {}
    assert untimed(plan.learned) == {"u:userId123": Known("g-after")}


def test_a_delete_queued_from_the_tracking_api_is_refused_and_forgets_nothing() -> None:
    # Ingest refuses them; one queued by an earlier version (source api) is not honoured.
    raw = [identify({**IDS, "plan": "pro"}), {"type": "delete", "userId": "userId123"}, track()]
    items = [
        Envelope.new(event, source=source, received_at=0.0, rid=f"r{n}")
        for n, (event, source) in enumerate(zip(raw, ["api", "api", "operator"], strict=True))
    ]
    parsed, _ = parse_items(items)
    plan = plan_batch(parsed, {}, Mapping())
    assert plan.forgotten == {}
    assert [(i.id, reason) for i, reason in plan.skipped] == [("r1", "delete_refused")]
    assert [i.id for i, _ in plan.send] == ["r0", "r2"]


def test_lookup_keys_are_those_of_events_missing_an_id() -> None:
    parsed, _ = parse_items(
        items_of(
            [
                track(),
                track(properties=IDS, userId="has-ids"),
                {"type": "track", "anonymousId": "anon-9", "event": "Viewed"},
                {"type": "page", "userId": "pager"},
            ],
            "api",
        )
    )
    assert lookup_keys(parsed, Mapping()) == ["a:anon-9", "u:userId123"]


def test_items_whose_event_no_longer_parses_are_reported() -> None:
    good_item = items_of([track(properties=IDS)], "api")[0]
    broken = Envelope.new(
        {"type": "track", "userId": "u1"}, source="api", received_at=0.0, rid="r9"
    )
    parsed, bad = parse_items([good_item, broken])
    assert [item.id for item, _ in parsed] == ["r0"]
    assert [item.id for item, _ in bad] == ["r9"]
    assert all(problems and problems[0] for _, problems in bad)


TRACK = TrackEvent(account=ACCOUNT, contact=CONTACT, event_name="Login", event_date=WHEN)
ATTRIBUTE = SetAttribute(account=ACCOUNT, contact=CONTACT, entity="contact", name="Plan", value=1)
INCREMENT = IncrementAttribute(account=ACCOUNT, contact=CONTACT, entity="account", name="Logins",
                               value=1)  # fmt: skip
PROBLEMS = {
    "valid-track": (TRACK, []),
    "valid-attribute": (ATTRIBUTE, []),
    "valid-increment": (INCREMENT, []),
    "empty-account": (replace(TRACK, account=""), ["accountExternalId is empty"]),
    "empty-contact": (replace(ATTRIBUTE, contact=""), ["contactExternalId is empty"]),
    "both-ids-too-long": (
        replace(TRACK, account=LONG_ID, contact=LONG_ID),
        [
            "accountExternalId is longer than 100 characters",
            "contactExternalId is longer than 100 characters",
        ],
    ),
    "empty-event-name": (replace(TRACK, event_name=" "), ["eventName is empty"]),
    "no-event-date": (replace(TRACK, event_date=None), ["eventDate is missing"]),
    "long-description": (
        replace(TRACK, description="d" * 256),
        ["description is longer than 255 characters"],
    ),
    "description-255": (replace(TRACK, description="d" * 255), []),
    "blank-attribute": (replace(ATTRIBUTE, name=" "), ["attribute name is empty"]),
    "blank-increment": (replace(INCREMENT, name=""), ["attribute name is empty"]),
    "bad-entity": (replace(ATTRIBUTE, entity="user"), ["entity must be account or contact"]),
}


@pytest.mark.parametrize(("command", "problems"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_what_churnzero_would_swallow_is_found(command: Command, problems: list[str]) -> None:
    assert command.problems() == problems


def test_each_command_is_the_json_churnzero_takes() -> None:
    assert TRACK.to_dict() == track_event("Login", quantity=1)
    assert ATTRIBUTE.to_dict() == set_attr("Plan", 1)
    assert INCREMENT.to_dict() == {
        "accountExternalId": ACCOUNT, "contactExternalId": CONTACT,
        "action": "incrementAttribute", "entity": "account", "name": "Logins", "value": 1,
    }  # fmt: skip
    full = replace(TRACK, description="d", allow_dupes=True, custom={"Plan": "pro"})
    assert list(full.to_dict()) == [
        "accountExternalId", "contactExternalId", "action", "eventName", "eventDate",
        "description", "quantity", "allowDupes", "cf_Plan",
    ]  # fmt: skip


def test_only_a_lesson_with_an_account_releases_waiting_events() -> None:
    def released(batch: list[Any]) -> set[str]:
        parsed, _ = parse_items(items_of(batch, "api"))
        return plan_batch(parsed, {}, Mapping()).released

    assert released([identify({"email": "ann@acme.io"})]) == set()
    assert released([group("g-1", {}, anonymousId="anon-1")]) == {"u:userId123", "a:anon-1"}
    assert released([{"type": "alias", "userId": "userId123", "previousId": "p"}]) == {
        "u:p", "a:p"
    }  # fmt: skip
