"""What an operator's search and replay filters mean: times, outcomes, the SQL they make."""

from __future__ import annotations

import pytest

from relay.archive import replay, schema, search
from relay.archive.search import Query, QueryError, parse_time

NOW = 1_796_690_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("90s", NOW - 90),
        ("15m", NOW - 900),
        ("2h", NOW - 7200),
        (" 7d ", NOW - 7 * 86400),
        ("1w", NOW - 7 * 86400),
        ("1.5h", NOW - 5400),
        ("2026-12-01", 1_796_083_200.0),
        ("2026-12-01T06:00:00", 1_796_083_200.0 + 6 * 3600),
        ("2026-12-01T06:00:00Z", 1_796_083_200.0 + 6 * 3600),
        ("2026-12-01T08:00:00+02:00", 1_796_083_200.0 + 6 * 3600),
        ("1796083200", 1_796_083_200.0),
    ],
)
def test_times_relative_iso_or_unix(text: str, expected: float) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-", "2026-13-01", "5y"])
def test_a_time_that_cannot_be_read_is_refused_with_the_forms(text: str) -> None:
    with pytest.raises(QueryError, match="is not a time: give now, how long ago"):
        parse_time(text, NOW)


def test_filters_from_the_operator() -> None:
    query = Query.of({"user_id": " ann ", "since": "2h", "until": "", "outcome": None}, NOW)
    assert query == Query(user_id="ann", since=NOW - 7200)
    assert query.days() == ("2026-12-07", None)  # two hours before 00:33 UTC
    with pytest.raises(QueryError, match="outcome is one of delivered, skipped, dead"):
        Query.of({"outcome": "lost"}, NOW)
    with pytest.raises(QueryError, match="--since is after --until"):
        Query.of({"since": "1h", "until": "2h"}, NOW)
    with pytest.raises(QueryError, match="unknown filter 'colour'"):
        Query.of({"colour": "red"}, NOW)


def test_id_lookups_compare_the_key_then_the_id() -> None:
    where, params = Query(message_id="m1", user_id="ann", outcome="dead").where()
    assert where.startswith("message_key = ? AND message_id = ? AND user_key = ? AND user_id = ?")
    assert params[:4] == [schema.key_of("m1"), "m1", schema.key_of("ann"), "ann"]
    assert params[-1] == "dead"
    assert Query().where() == ("TRUE", [])
    _, timed = Query(since=1.5, until=2.0).where()
    assert timed == [1500, 2000]


def test_a_replay_is_named_by_its_filters_as_written() -> None:
    one = replay.Replay.id_of({"since": "2h", "until": "now", "user_id": "ann"})
    assert one == replay.Replay.id_of(
        {"user_id": "ann", "until": "now", "since": "2h", "event": ""}
    )
    assert one != replay.Replay.id_of({"since": "3h", "until": "now", "user_id": "ann"})


def test_the_search_limit_is_positive() -> None:
    with pytest.raises(QueryError, match="at least 1"):
        search.search(None, None, Query(), 0)  # type: ignore[arg-type]


def test_records_not_yet_archived_are_filtered_as_read() -> None:
    rec = {"settled_at": NOW - 60, "user_id": "ann", "outcome": "skipped", "event": "Login"}
    assert Query(user_id="ann", outcome="skipped", since=NOW - 120).admits(rec)
    assert not Query(user_id="bob").admits(rec)
    assert not Query(since=NOW - 30).admits(rec)
    assert not Query(until=NOW - 90).admits(rec)
    assert not Query(message_id="m1").admits(rec)  # the record has none
