"""The dead-letter entry as stored, and the rules of an operator's selection."""

from __future__ import annotations

import orjson
import pytest

from relay.errors import DecodeError
from relay.reasons import Reason
from relay.state import deadletter
from relay.state.deadletter import DeadLetter, Selection, SelectionError, select

ITEM = {"id": "r1", "source": "api", "received_at": 1.5, "attempts": 2,
        "event": {"type": "track", "userId": "u", "event": "E"}}  # fmt: skip


def test_an_entry_is_stored_in_the_json_earlier_versions_wrote() -> None:
    entry = deadletter.new_entry(
        ITEM, Reason.REJECTED, status=400, response="x" * 600, now=9.0, entry_id="e1"
    )
    assert list(orjson.loads(entry.to_json())) == [
        "id", "reason", "item", "errors", "status", "response", "attempts",
        "first_failure", "last_failure",
    ]  # fmt: skip
    assert orjson.loads(entry.to_json())["reason"] == "rejected"
    assert (entry.attempts, entry.first_failure, len(entry.response or "")) == (2, 9.0, 500)
    assert DeadLetter.from_json(entry.to_json()) == entry


def test_numbers_are_kept_as_they_were_written() -> None:
    # An int time, as a caller may pass: read back, it is written out the same.
    raw = deadletter.new_entry(ITEM, Reason.NEW_NAME, now=1718000000, entry_id="e2").to_json()
    assert DeadLetter.from_json(raw).to_json() == raw


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": "e3", "reason": "rejected"}', "bad or missing item, errors, status"),
        (b'{"id": "e4", "reason": "rejected", "item": "x", "errors": [], "status": null, '
         b'"response": null, "attempts": 0, "first_failure": 1, "last_failure": 1}',
         "bad or missing item"),
        (b'{"id": "e5", "reason": "lost", "item": {}, "errors": [], "status": null, '
         b'"response": null, "attempts": 0, "first_failure": 1, "last_failure": 1}',
         "unknown reason 'lost'"),
    ],
)  # fmt: skip
def test_what_is_not_an_entry_is_a_decode_error(raw: bytes, problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        DeadLetter.from_json(raw)


def test_a_selection_is_ids_or_all_or_a_reason_never_both_nor_neither() -> None:
    assert select(["a", "b"], since=5.0) == Selection(("a", "b"))  # ids ignore the window
    assert select(every=True, until=5.0) == Selection(until=5.0)
    assert select(reason=Reason.WORKER_ERROR) == Selection(reason=Reason.WORKER_ERROR)
    with pytest.raises(SelectionError) as both:
        select(["a"], reason=Reason.REJECTED)
    assert both.value.mixed
    with pytest.raises(SelectionError) as neither:
        select([], since=5.0)
    assert not neither.value.mixed
