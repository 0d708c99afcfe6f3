"""clock.parse_instant: the fast path for RFC 3339 reads every instant as pydantic does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from relay import clock
from tests.conftest import examples

OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]


def by_pydantic(value: Any) -> datetime | None:
    """What parse_instant answered before the fast path: pydantic's reading, in UTC."""
    try:
        when = clock._INSTANT.validate_python(value)
    except ValidationError:
        return None
    try:
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except OverflowError:
        return None


@settings(max_examples=examples(500))
@given(st.datetimes(timezones=st.sampled_from(OFFSETS)),
       st.sampled_from(["seconds", "milliseconds", "microseconds"]))  # fmt: skip
def test_rfc3339_reads_as_pydantic_reads_it(when: datetime, spec: str) -> None:
    text = when.isoformat(timespec=spec).replace("+00:00", "Z")
    assert clock.parse_instant(text) == by_pydantic(text)


@pytest.mark.parametrize(
    "text",
    ["2024-05-14T09:31:12.1Z", "2024-05-14T09:31:12-00:00", "2024-02-30T00:00:00Z",
     "2024-05-14T24:00:00Z", "2024-05-14T09:31:12+24:00", "0001-01-01T00:00:00+01:00",
     "9999-12-31T23:59:59-01:00", "2024-W20-2", "2024-05-14", "1715679072345", "soon"],
)  # fmt: skip
def test_edge_cases_read_as_pydantic_reads_them(text: str) -> None:
    assert clock.parse_instant(text) == by_pydantic(text)
