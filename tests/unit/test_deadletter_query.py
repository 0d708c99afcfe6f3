"""Dead letters as an operator names them: which match a filter, how a selection tallies,
and how `relay dlq show` orders an entry."""

from __future__ import annotations

from typing import Any

from relay.ops.cli_dlq import readable
from relay.reasons import Reason
from relay.state import deadletter
from relay.state.deadletter_query import AmbiguousId, Match, Tally, event_name


def entry(reason: Reason = Reason.REJECTED, **event: Any) -> deadletter.DeadLetter:
    return deadletter.new_entry({"id": "r", "event": event}, reason, now=1_700_000_000.0)


def test_a_match_by_user_event_and_message_id() -> None:
    ann = entry(type="track", event="Login", userId="ann", messageId="m1")
    anon = entry(type="identify", anonymousId="a-1", messageId="m2")
    assert Match(user="ann")(ann) and not Match(user="ann")(anon)
    assert Match(user="a-1")(anon)
    assert Match(event="Login")(ann) and Match(event="identify")(anon)
    assert not Match(event="track")(ann)  # a track is named by its event
    assert Match(message_id="m2")(anon) and not Match(message_id="m2")(ann)
    assert Match(user="ann", event="Login", message_id="m1")(ann)
    assert not Match(user="ann", event="Signup")(ann)
    assert not Match() and Match(user="ann")


def test_an_entry_whose_event_is_not_an_object_matches_only_no_filter() -> None:
    raw = deadletter.new_entry({"id": "r", "event": "garbage"}, Reason.UNDECODABLE_MESSAGE)
    assert Match()(raw) and not Match(user="ann")(raw)
    assert event_name("garbage") == "?" and event_name({"type": "track"}) == "track"


def test_a_tally_counts_by_reason_and_event_largest_first() -> None:
    tally = Tally()
    pages = [
        [entry(type="track", event="Login"), entry(type="track", event="Login")],
        [entry(Reason.NEW_NAME, type="identify")],
    ]
    assert list(tally.counting(pages)) == pages  # passed through whole
    assert tally.as_dict() == {
        "total": 3,
        "by_reason": {"rejected": 2, "new_name": 1},
        "by_event": {"Login": 2, "identify": 1},
    }


def test_an_ambiguous_prefix_names_its_candidates() -> None:
    text = str(AmbiguousId("ab", ["ab01", "ab02"]))
    assert "ab01, ab02" in text and "give more of the id" in text
    many = str(AmbiguousId("a", [f"a{i:02}" for i in range(12)]))
    assert "12 dead letters" in many and many.count(", ") == 10


def test_show_puts_why_first_and_readable_times() -> None:
    shown = readable(entry(type="track", event="E").as_dict() | {"errors": ["bad"]})
    assert list(shown)[:5] == ["errors", "reason", "status", "response", "attempts"]
    assert shown["last_failure"] == "2023-11-14 22:13:20 UTC"
    assert shown["item"]["event"]["event"] == "E"
