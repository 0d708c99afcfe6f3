"""Segment events: parsed once, into a discriminated union on `type`.

Lenient where the meaning is clear (as Segment's own tracking API is): timestamps with
ms, µs or ns and any offset, or epoch milliseconds; numeric ids become strings;
`version` of any type; unknown keys kept in the stored event (the model reads only the
keys it declares). `traits` and `properties` stay free-form.

The models are also the OpenAPI document's event schemas (relay.ingest.openapi): where what is
accepted is wider than the Python type, a `WithJsonSchema` says so, without changing
validation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from relay import clock

# Types the relay accepts; page and screen are counted and skipped.
EVENT_TYPES = ("identify", "track", "page", "screen", "group", "alias", "delete")
DELIVERED_TYPES = frozenset({"identify", "track", "group", "alias", "delete"})

# Segment libraries send numeric ids too: they are kept as their text.
_Id = Annotated[str, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}]})]
# A JSON object, checked to be one and taken as it is: `dict[str, Any]` would copy every
# object of every event, and a JSON object's keys are strings anyway. The event's objects
# are read, never changed: sharing them with the raw event is safe.
_Object = InstanceOf[dict[str, Any]]
_Timestamp = Annotated[
    datetime,
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]}),
]


class _Base(BaseModel):
    # Unknown keys are kept in the stored event (relay.events.normalized copies the raw
    # one); the model reads only the keys it declares: keeping the others here too would be
    # work per event that nothing reads. The schema still says other keys are welcome.
    model_config = ConfigDict(
        extra="ignore", coerce_numbers_to_str=True,
        json_schema_extra={"additionalProperties": True},
    )  # fmt: skip

    userId: _Id | None = None
    anonymousId: _Id | None = None
    messageId: _Id | None = None
    timestamp: _Timestamp | None = Field(
        None,
        description="ISO-8601 with any offset, or epoch milliseconds; absent or unreadable: "
        "the time of receipt",
    )
    context: _Object = Field(default_factory=dict)
    integrations: _Object = Field(
        default_factory=dict,
        description="`ChurnZero: false` (or `Churnzero: false`) skips the event; so does "
        "`All: false` on /v1/* unless ChurnZero is enabled",
    )
    version: Any = None

    # groupId and previousId belong to subclasses, as traits and properties below do.
    @field_validator("userId", "anonymousId", "messageId", "groupId", "previousId",
                     mode="after", check_fields=False)  # fmt: skip
    @classmethod
    def _blank_is_missing(cls, value: str | None) -> str | None:
        # Libraries send "" for "not set"; treating it as an id would merge strangers.
        if value is None or not value.strip():
            return None
        return value

    @field_validator("timestamp", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:  # e.g. year 1 at +01:00: no such UTC instant
            raise ValueError("timestamp out of range") from None

    # traits / properties belong to subclasses; one validator serves every object field.
    @field_validator("context", "integrations", "traits", "properties", mode="before",
                     check_fields=False)  # fmt: skip
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return {} if value is None else value


class _Identified(_Base):
    """A call that must say who it is about: a userId or an anonymousId."""

    @model_validator(mode="after")
    def _needs_identity(self) -> Self:
        if self.userId is None and self.anonymousId is None:
            raise ValueError("userId or anonymousId is required")
        return self


class Identify(_Identified):
    """An identify call: who the user is, with traits."""

    type: Literal["identify"]
    traits: _Object = Field(default_factory=dict)


class Track(_Identified):
    """A track call: something the user did, with properties."""

    type: Literal["track"]
    event: str = Field(min_length=1, description="the event's name (ChurnZero's eventName)")
    properties: _Object = Field(default_factory=dict)


class Page(_Base):
    """A page view (accepted, not delivered to ChurnZero)."""

    type: Literal["page"]


class Screen(_Base):
    """A screen view (accepted, not delivered to ChurnZero)."""

    type: Literal["screen"]


class Group(_Base):
    """A group call: the user belongs to the account `groupId`, with account traits."""

    type: Literal["group"]
    groupId: _Id | None = None
    traits: _Object = Field(default_factory=dict)


class Alias(_Base):
    """An alias call: `previousId` (an earlier userId or anonymousId) is `userId`."""

    type: Literal["alias"]
    previousId: _Id | None = None


class Delete(_Base):
    """A user deletion request: the relay forgets the user (nothing reaches ChurnZero)."""

    type: Literal["delete"]


AnyEvent = Identify | Track | Page | Screen | Group | Alias | Delete
# A named alias, so that JSON Schema gives the union one definition that others refer to.
Event = TypeAliasType("Event", Annotated[AnyEvent, Field(discriminator="type")])
EVENT: TypeAdapter[AnyEvent] = TypeAdapter(Event)
_VALIDATE = EVENT.validator.validate_python


def parse(raw: dict[str, Any]) -> AnyEvent:
    """One event from its JSON object; raises pydantic.ValidationError."""
    kind = raw.get("type")
    if isinstance(kind, str) and kind != kind.lower():
        raw = {**raw, "type": kind.lower()}
    # The validator itself: TypeAdapter's wrapper adds a layer of Python to every call.
    event: AnyEvent = _VALIDATE(raw)
    return event


def normalized(
    raw: dict[str, Any], event: AnyEvent, received_at: datetime, *, stamp: datetime | None = None
) -> dict[str, Any]:
    """The event as the relay stores it: the original keys, with ids, type and timestamp
    normalised (ids as strings, timestamp ISO-8601 UTC: `stamp` if given, the event's,
    or the receipt's)."""
    out = dict(raw)
    out["type"] = event.type
    for key in ("userId", "anonymousId", "messageId"):
        value = getattr(event, key)
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    stamp = stamp or event.timestamp or received_at
    out["timestamp"] = clock.iso(stamp)
    return out
