"""How Segment fields map to ChurnZero: Segment's destination's defaults, and a TOML file
(`RELAY_MAPPING_FILE`) that can change them.

Example file::

    [identity]
    account_paths = ["traits.company.id"]      # tried after accountExternalId/ID
    contact_paths = ["traits.email", "context.traits.email"]
    # Where a contact id comes from once the account is known (after the contact the
    # relay learned for the user): a trait name, userId, anonymousId or a dotted path.
    contact_order = ["contactExternalId", "email", "userId"]
    account_contact = "segment-account-sync"  # contact of group calls with no person

    [traits]
    rename = { plan = "Plan Name" }            # trait -> ChurnZero attribute
    account = ["plan", "mrr"]                  # set on the account, not the contact
    ignore = ["password"]
    allow = []                                 # non-empty: only these traits are sent
    account_name_from_company = false          # true: traits.company.name -> account Name

    [group]                                    # group traits -> account attributes
    rename = { plan = "Plan Name" }
    ignore = ["address"]
    allow = []                                 # non-empty: only these traits are sent
    name = false                               # true: traits.name -> account Name

    [events]
    rename = { "Clicked Login Button" = "Login" }
    allow = []                                 # non-empty: only these events
    deny = ["Heartbeat"]

    [events.fields]                            # properties sent as cf_<name>
    "Order Completed" = ["revenue"]
    "*" = ["plan"]

    [events.increment]                         # incrementAttribute by the quantity
    "Seat Added" = { attribute = "Seats", entity = "account" }
    "Report Run" = { attribute = "Reports Run", track = true }   # and the trackEvent
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.errors import MappingError

DEFAULT_RENAMES = {
    "firstName": "FirstName",
    "first_name": "FirstName",
    "lastName": "LastName",
    "last_name": "LastName",
    "email": "Email",
}


# Traits of Segment's identify spec that are not ChurnZero attributes: each would become
# a custom field on every contact, so they are sent only when the mapping names them.
RESERVED_UNSENT = frozenset(
    {"id", "avatar", "createdAt", "address", "age", "birthday", "gender", "username",
     "website", "description"}
)  # fmt: skip


# Traits of Segment's group spec that are not ChurnZero account attributes (`name` aside:
# the `[group] name` switch decides it): held back unless the mapping names them.
GROUP_RESERVED_UNSENT = frozenset(
    {"id", "email", "website", "createdAt", "avatar", "description", "phone", "employees",
     "industry", "address"}
)  # fmt: skip


CONTACT_ID = "contactExternalId"  # in contact_order: the contactExternalId/ID traits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentityMap(_Section):
    """Extra dotted paths where account and contact ids may be found."""

    account_paths: tuple[str, ...] = ()
    contact_paths: tuple[str, ...] = ()
    contact_order: tuple[Annotated[str, Field(min_length=1)], ...] = (CONTACT_ID, "email", "userId")
    # The contact of account-level writes that name no person (a group call with only an
    # anonymousId); unset: such a call is dead-lettered as `no_contact`.
    account_contact: Annotated[str, Field(min_length=1, max_length=100)] | None = None


class TraitMap(_Section):
    """Trait renames, account-level traits, traits never sent, and the allow list."""

    rename: dict[str, str] = Field(default_factory=dict)
    account: frozenset[str] = frozenset()
    ignore: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    # Off by default: any user's identify would otherwise rename the whole account.
    account_name_from_company: bool = False


class GroupMap(_Section):
    """Group traits as account attributes: renames, the allow and ignore lists, and
    whether `name` overwrites the account Name (the CRM usually owns it)."""

    rename: dict[str, str] = Field(default_factory=dict)
    ignore: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    name: bool = False

    def attribute(self, trait: str) -> str | None:
        """The account attribute a group trait is written to; None: not sent."""
        if trait in self.ignore or (self.allow and trait not in self.allow):
            return None
        if trait == "name":
            return self.rename.get(trait, "Name") if self.name else None
        if self.reserved(trait):
            return None
        return self.rename.get(trait, trait)

    def reserved(self, trait: str) -> bool:
        """Whether a group trait is one of Segment's reserved ones the mapping does not
        name (held back: it would become an account custom field)."""
        named = trait in self.rename or trait in self.allow
        return trait in GROUP_RESERVED_UNSENT and not named and trait not in self.ignore


class Increment(_Section):
    """An event counted on an attribute (incrementAttribute by its quantity)."""

    attribute: str = Field(min_length=1)
    entity: Literal["contact", "account"] = "contact"
    track: bool = False  # true: the trackEvent is sent as well


class EventMap(_Section):
    """Event renames, allow/deny lists, custom (`cf_`) fields and increments per event."""

    rename: dict[str, str] = Field(default_factory=dict)
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    fields: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    increment: dict[str, Increment] = Field(default_factory=dict)


class Mapping(_Section):
    """The whole mapping; `Mapping()` is the default."""

    identity: IdentityMap = IdentityMap()
    traits: TraitMap = TraitMap()
    group: GroupMap = GroupMap()
    events: EventMap = EventMap()

    def attribute_name(self, trait: str) -> str:
        """The ChurnZero attribute a trait is written to."""
        return self.traits.rename.get(trait) or DEFAULT_RENAMES.get(trait, trait)

    def trait_wanted(self, trait: str) -> bool:
        """Whether a trait is sent: not ignored, allowed, and not a reserved Segment
        field unless the mapping names it."""
        traits = self.traits
        if trait in traits.ignore:
            return False
        if traits.allow:
            return trait in traits.allow
        return not self.trait_reserved(trait)

    def trait_reserved(self, trait: str) -> bool:
        """Whether a trait is one of Segment's reserved ones the mapping does not name
        (held back: it would become a contact custom field)."""
        traits = self.traits
        if trait in traits.ignore or traits.allow:
            return False
        named = trait in traits.rename or trait in traits.account
        return trait in RESERVED_UNSENT and not named

    def event_name(self, event: str) -> str:
        """The ChurnZero event name of a Segment event."""
        return self.events.rename.get(event, event)

    def event_wanted(self, event: str) -> bool:
        """Whether the allow/deny lists let this event through."""
        if event in self.events.deny:
            return False
        return not self.events.allow or event in self.events.allow

    def custom_fields(self, event: str) -> tuple[str, ...]:
        """Properties of this event sent as `cf_<name>` fields."""
        return self.events.fields.get(event, ()) + self.events.fields.get("*", ())


def load_mapping(path: Path | None) -> Mapping:
    """The mapping in `path` (defaults when None), or MappingError with line and key."""
    if path is None:
        return Mapping()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{path}: {exc}") from None
    try:
        return Mapping.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error["loc"]]
        line = _line_of(text, loc)
        where = f"line {line}, " if line else ""
        raise MappingError(f"{path}: {where}key {'.'.join(loc)}: {error['msg']}") from None


def _line_of(text: str, loc: list[str]) -> int | None:
    # TOML parsers report no positions for valid syntax: find the key inside its table.
    *tables, key = loc or [""]
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            table = [p.strip().strip('"') for p in stripped.strip("[]").split(".")]
            if table == loc:
                return number  # the unknown name is a table of its own
            continue
        name = stripped.split("=", 1)[0].strip().strip('"')
        if "=" in stripped and [*table, name] == [*tables, key]:
            return number
        if "=" in stripped and table == tables[:-1] and name == (tables[-1:] or [""])[0]:
            return number  # an inline table holding the key
    return None
