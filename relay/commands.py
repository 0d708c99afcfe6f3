"""ChurnZero commands as typed values: what the relay sends to ChurnZero's `/i`.

ChurnZero's HTTP API takes commands as JSON objects named by `action`; the relay sends
three: `trackEvent` (an event in the contact's history), `setAttribute` and
`incrementAttribute` (a field of the account or the contact). Each type here knows its
JSON object (`to_dict`: the keys in the order the relay has always sent them; the client
adds `appKey`) and what in it ChurnZero would silently swallow (`problems`): ChurnZero
answers 200 to everything it is sent, so commands are checked before they go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

MAX_ID = 100
MAX_DESCRIPTION = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class _Command:
    account: str  # accountExternalId
    contact: str  # contactExternalId
    ACTION: ClassVar[str]

    def _head(self) -> dict[str, Any]:
        return {
            "accountExternalId": self.account,
            "contactExternalId": self.contact,
            "action": self.ACTION,
        }

    def _id_problems(self) -> list[str]:
        if 0 < len(self.account) <= MAX_ID and 0 < len(self.contact) <= MAX_ID:
            return []  # the usual case, checked at once: a command per event goes through
        problems = []
        for key, value in (
            ("accountExternalId", self.account),
            ("contactExternalId", self.contact),
        ):
            if not value:
                problems.append(f"{key} is empty")
            elif len(value) > MAX_ID:
                problems.append(f"{key} is longer than {MAX_ID} characters")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackEvent(_Command):
    """An event in the contact's history."""

    ACTION = "trackEvent"
    event_name: str
    event_date: str | None  # ISO-8601 UTC
    description: str | None = None
    quantity: int | float = 1
    allow_dupes: bool | None = None
    custom: dict[str, Any] = field(default_factory=dict)  # `cf_<name>` fields, by name

    def to_dict(self) -> dict[str, Any]:
        """The command's JSON object."""
        out = self._head() | {"eventName": self.event_name, "eventDate": self.event_date}
        if self.description is not None:
            out["description"] = self.description
        out["quantity"] = self.quantity
        if self.allow_dupes is not None:
            out["allowDupes"] = self.allow_dupes
        for name, value in self.custom.items():
            out[f"cf_{name}"] = value
        return out

    def problems(self) -> list[str]:
        """What ChurnZero would silently swallow (empty: nothing)."""
        problems = self._id_problems()
        if not self.event_name or self.event_name.isspace():
            problems.append("eventName is empty")
        if not self.event_date:
            problems.append("eventDate is missing")
        # ChurnZero counts UTF-16 code units (an emoji is two): at most two per character.
        text = self.description or ""
        if len(text) > MAX_DESCRIPTION // 2 and len(text.encode("utf-16-le")) > 2 * MAX_DESCRIPTION:
            problems.append(f"description is longer than {MAX_DESCRIPTION} characters")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class _Attribute(_Command):
    entity: str  # account or contact
    name: str
    value: Any

    def to_dict(self) -> dict[str, Any]:
        """The command's JSON object."""
        return self._head() | {"entity": self.entity, "name": self.name, "value": self.value}

    def problems(self) -> list[str]:
        """What ChurnZero would silently swallow (empty: nothing)."""
        problems = self._id_problems()
        if not self.name.strip():
            problems.append("attribute name is empty")
        if self.entity not in ("account", "contact"):
            problems.append("entity must be account or contact")
        return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class SetAttribute(_Attribute):
    """A field of the account or the contact set to a value."""

    ACTION = "setAttribute"
    value: bool | int | float | str  # lists are joined into a string before


@dataclass(frozen=True, slots=True, kw_only=True)
class IncrementAttribute(_Attribute):
    """A numeric field of the account or the contact increased by a quantity."""

    ACTION = "incrementAttribute"
    value: int | float


Command = TrackEvent | SetAttribute | IncrementAttribute
