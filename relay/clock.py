"""Client clocks, corrected the way Segment does: pure functions, no I/O.

A browser's or phone's clock can be hours off. Segment's libraries stamp each event
with the client's `timestamp` and, when they send it, `sentAt` (per event, or once for
a whole batch); Segment then computes

    timestamp = receivedAt - (sentAt - originalTimestamp)

so that the time between the event and its sending, measured on the client's clock,
is laid onto the server's clock. The client's value is kept as `originalTimestamp`.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

_INSTANT: TypeAdapter[datetime] = TypeAdapter(datetime)
# What Segment's libraries send: RFC 3339 with `Z` or an offset. These the standard
# library reads to the same instant as pydantic, with less work per call (a sentAt per
# event of a batch); anything else goes through pydantic's lenient parser.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")


def parse_instant(value: Any) -> datetime | None:
    """A timestamp as Segment's libraries send it (ISO-8601 or epoch ms), in UTC, or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= _REMEMBERED_CHARS:
        return _parse_text(value)
    return _parse(value)


# The events of a batch usually carry one and the same sentAt: read once, not per event
# (datetimes are immutable, so sharing one is safe). Longer strings are no timestamp.
_REMEMBERED_CHARS = 64


@functools.lru_cache(maxsize=256)
def _parse_text(value: str) -> datetime | None:
    return _parse(value)


def _parse(value: Any) -> datetime | None:
    try:
        if isinstance(value, str) and _RFC3339.fullmatch(value):
            when = datetime.fromisoformat(value)
        else:
            when = _INSTANT.validate_python(value)
    except (ValidationError, ValueError):
        return None
    try:
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:
        return None


def corrected(original: datetime, sent_at: datetime | None, received_at: datetime) -> datetime:
    """Segment's correction; without a usable `sentAt`, the client's timestamp as is."""
    if sent_at is None:
        return original
    try:
        return received_at - (sent_at - original)
    except OverflowError:  # absurd clocks: keep what the client said rather than fail
        return original


def iso(when: datetime) -> str:
    """ISO-8601 UTC with a `Z`, as the relay stores timestamps."""
    return when.isoformat().replace("+00:00", "Z")
