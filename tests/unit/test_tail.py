"""The live tail's pieces: what a record entry says, old or new, and which events pass."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.commands import TrackEvent
from relay.envelope import Envelope
from relay.reasons import Reason
from relay.state import deadletter, status, tail, trace


class Pipe:
    """Takes what stage_record queues, as a Redis pipeline would."""

    def __init__(self) -> None:
        self.added: list[tuple[str, dict[str, Any]]] = []

    def xadd(self, key: str, fields: dict[str, Any], **_: Any) -> None:
        self.added.append((key, fields))


def envelope(**event: Any) -> Envelope:
    return Envelope.new(event, source="api", received_at=1.0, rid="r-" + event["messageId"])


def test_a_settlement_recorded_names_each_events_user_and_event() -> None:
    pipe = Pipe()
    ann = envelope(type="track", event="Login", userId="ann", messageId="m1")
    anon = envelope(type="page", anonymousId="a-9", messageId="m2")
    dead = deadletter.new_entry(
        {"id": "r3", "event": {"type": "identify", "userId": 42, "messageId": "m3"}},
        Reason.REJECTED, entry_id="e3",
    )  # fmt: skip
    command = TrackEvent(account="A", contact="C", event_name="Login", event_date=None)
    trace.stage_record(
        pipe, 100, delivered=[(ann, [command])], skipped=[(anon, "unsupported_type")], dead=[dead]
    )
    [(_, fields)] = pipe.added
    got = tail.parse(b"1700000000123-0", {b"v": fields["v"]})
    assert [(s.outcome, s.user, s.event, s.message_id) for s in got] == [
        ("delivered", "ann", "Login", "m1"),
        ("skipped", "a-9", "page", "m2"),
        ("dead", "42", "identify", "m3"),
    ]
    assert got[0].at == 1700000000.123
    assert got[0].commands == [command.to_dict()] and got[0].relay_id == "r-m1"
    assert (got[1].reason, got[1].commands) == ("unsupported_type", [])
    assert (got[2].reason, got[2].entry) == ("rejected", "e3")


def test_entries_written_before_the_user_was_recorded_stay_readable() -> None:
    old = orjson.dumps([
        ["d", "m1", "r1", [{"action": "trackEvent"}]],
        ["s", "m2", "r2", "duplicate"],
        ["x", "m3", "r3", "rejected", "e3"],
    ])  # fmt: skip
    got = tail.parse("5000-1", {"v": old})
    assert [(s.outcome, s.user, s.event, s.entry) for s in got] == [
        ("delivered", "", "", ""), ("skipped", "", "", ""), ("dead", "", "", "e3"),
    ]  # fmt: skip
    # No user recorded: a user filter passes none of them, an outcome filter still works.
    assert not any(map(tail.Filter(user="ann"), got))
    assert [s.message_id for s in got if tail.Filter(outcome="dead")(s)] == ["m3"]


def test_an_unreadable_entry_is_skipped_not_fatal() -> None:
    assert tail.parse("1-0", {b"v": b"{not json"}) == []
    assert tail.parse("1-0", {b"v": b'[["?", "m", "r", "x"], 7]'}) == []
    assert tail.parse("1-0", {}) == []


def test_a_filter_keeps_one_users_events_of_one_outcome() -> None:
    def settled(outcome: str, user: str) -> tail.Settled:
        return tail.Settled(1.0, outcome, "m", "r", user, "E", [], "", "")

    events = [settled("delivered", "ann"), settled("dead", "ann"), settled("delivered", "bob")]
    assert list(filter(tail.Filter(), events)) == events
    assert list(filter(tail.Filter(user="ann", outcome="delivered"), events)) == events[:1]
    assert list(filter(tail.Filter(outcome="dead"), events)) == events[1:2]
    with pytest.raises(ValueError, match="outcome must be one of"):
        tail.Filter(outcome="lost")


def test_an_xread_reply_gives_the_events_passing_and_the_last_id_read() -> None:
    value = orjson.dumps([["d", "m1", "r1", [], None, "ann", "E"]])
    other = orjson.dumps([["d", "m2", "r2", [], None, "bob", "E"]])
    reply = [[b"relay:trace", [(b"10-0", {b"v": value}), (b"11-0", {b"v": other})]]]
    found, last = tail.settled_after(reply, tail.Filter(user="ann"))
    assert [s.message_id for s in found] == ["m1"] and last == "11-0"
    assert tail.settled_after(None, tail.Filter()) == ([], None)


class Counts:
    """Answers MGET from per-second counts, as Redis would."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def mget(self, names: list[str]) -> list[bytes | None]:
        return [str(self.counts[n]).encode() if n in self.counts else None for n in names]


def test_an_hour_of_history_in_ten_second_steps() -> None:
    now = 1_000_000.5
    ingested = status.rate_key(status.Rate.INGESTED, now - 1)  # the last full second
    oldest = status.rate_key(status.Rate.DELIVERED, now - 3600)
    too_old = status.rate_key(status.Rate.DELIVERED, now - 3601)
    history = status.history(Counts({ingested: 5, oldest: 7, too_old: 100}), now)
    assert (history["end"], history["step_s"]) == (1_000_000, 10)
    assert len(history["ingested"]) == len(history["delivered"]) == 360
    assert history["ingested"][-1] == 5 and sum(history["ingested"]) == 5
    assert history["delivered"][0] == 7 and sum(history["delivered"]) == 7


def test_relay_tail_says_each_event_in_one_line() -> None:
    from relay.ops.cli_tail import line

    at = 1_700_000_000.0  # 22:13:20 UTC
    delivered = tail.Settled(at, "delivered", "m1", "r1", "ann", "Login", [{}, {}], "", "")
    dead = tail.Settled(at, "dead", "", "r2", "", "", [], "invalid_command", "e9")
    assert line(delivered) == "22:13:20  delivered  ann  Login  m1  (2 commands)"
    assert line(dead) == "22:13:20  dead       -  -  r2  (invalid_command, entry e9)"
