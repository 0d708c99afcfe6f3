"""Properties of parsing and translation, over any JSON a client could send.

Whatever the body, `parsing.parse_api` / `parse_webhook` give a `ParsedBody` or raise
a `RequestError` with status 400, never anything else (a 500). A batch is handled whole:
every event is accepted or rejected, none lost. Every accepted event can be stored
(queued, parked for a retry, dead-lettered), translates without raising, and each
command it yields passes its own check (`problems`) or the event lands in `invalid_command`.

Three bugs these properties found (an event nested 253+ levels deep, an aware timestamp
at the edge of datetime's range, an event nested ~251 deep that could be accepted but not
dead-lettered) have their own regression tests below, and their inputs are explicit
examples of the full-strength property.
"""

from __future__ import annotations

import itertools
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as label
from hypothesis import strategies as st

from relay import envelope, events
from relay.envelope import Envelope
from relay.errors import RequestError
from relay.ingest import parsing
from relay.mapping import EventMap, IdentityMap, Mapping, TraitMap
from relay.plan import lookup_keys, parse_items, plan_batch
from relay.reasons import Reason
from relay.resolution import Known
from relay.state import deadletter

RECEIVED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
ROUTES = ["webhook", *sorted(parsing.SINGLE_ROUTES), *sorted(parsing.BATCH_ROUTES)]
MAPPING = Mapping(
    identity=IdentityMap(account_paths=("context.groupId",), contact_paths=("userId",)),
    traits=TraitMap(account=frozenset({"plan"}), rename={"tier": "Tier"}),
    events=EventMap(fields={"*": ("plan", "tier")}),
)
FIELDS = ["type", "userId", "anonymousId", "messageId", "event", "timestamp", "traits",
          "properties", "context", "integrations", "version", "writeKey", "batch"]  # fmt: skip
# As many examples as the Hypothesis profile says (tests/conftest.py: a few by default, 120
# in CI).
PROPERTIES = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The fixed bugs: orjson serialises at most 254 nested levels but parses 1024, and an
# aware timestamp at the edge of datetime's range overflows in UTC.
BUG_DEPTH = 253  # parsing: orjson.dumps in _accept raises TypeError
BUG_STORED_DEPTH = 251  # accepted, but the worker cannot write its DLQ entry / delayed set
BUG_TIMESTAMP = "0001-01-01T00:00:00+01:00"  # events._utc: OverflowError

# Deep nesting cannot be built as Python objects (json.dumps would hit the recursion
# limit first): a marker string is swapped for the nested text after serialising.
_DEEP = re.compile(rb'"\\u0000deep(\d+)([ao])"')


def _nested(match: re.Match[bytes]) -> bytes:
    depth = int(match.group(1))
    if match.group(2) == b"a":
        return b"[" * depth + b"]" * depth
    return b'{"k":' * depth + b"null" + b"}" * depth


def dumps(value: Any) -> bytes:
    """JSON text of `value`, deep-nesting markers expanded."""
    return _DEEP.sub(_nested, json.dumps(value, allow_nan=False).encode())


def deep(low: int, high: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda n, kind: f"\x00deep{n}{kind}", st.integers(low, high), st.sampled_from("ao")
    )


def json_values(max_depth: int) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=2**63 - 2, max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
        | deep(1, max_depth)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=5,
    )


def timestamps(edge_offsets: bool) -> st.SearchStrategy[Any]:
    # Offsets only where the instant stays inside datetime's range when moved to UTC.
    low, high = (datetime.min, datetime.max) if edge_offsets else (
        datetime(2, 1, 1), datetime(9998, 12, 31)
    )  # fmt: skip
    offsets = st.timedeltas(timedelta(hours=-23, minutes=-59), timedelta(hours=23, minutes=59))
    aware = st.builds(
        lambda d, o: d.replace(tzinfo=timezone(o)).isoformat(),
        st.datetimes(low, high),
        offsets.map(lambda o: timedelta(minutes=o // timedelta(minutes=1))),
    )
    naive = st.datetimes(datetime.min, datetime.max).map(datetime.isoformat)
    epoch_ms = st.integers(-(10**15), 10**15) | st.floats(allow_nan=False, allow_infinity=False)
    return aware | naive | epoch_ms | st.text(max_size=30)


def ids() -> st.SearchStrategy[Any]:
    text = st.text(max_size=20) | st.text(min_size=95, max_size=110) | st.just("  ")
    return text | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.none()


# Mostly the delivered types, so translation sees plenty of events it must send.
KINDS = ["identify", "track"] * 4 + [*events.EVENT_TYPES, "Track", "IDENTIFY", "nope"]


@st.composite
def event_objects(draw: st.DrawFn, full: bool) -> dict[str, Any]:
    """A plausible event with any JSON value in any of its fields, at any depth."""
    anything = json_values(1100 if full else 200)
    id_bag = {"accountExternalId": draw(ids()), "contactExternalID": draw(ids())}
    out: dict[str, Any] = {
        "type": draw(st.sampled_from(KINDS)),
        "userId": draw(st.sampled_from(["u1", "known"]) | ids()),
        "messageId": draw(ids()),
        "event": draw(st.text(max_size=20)),
        "timestamp": draw(timestamps(full)),
        "traits": {**id_bag, "email": draw(anything), "plan": draw(anything),
                   "company": draw(anything), "first_name": draw(anything)},
        "properties": {**id_bag, "description": draw(st.text(max_size=300)),
                       "quantity": draw(anything), "tier": draw(anything)},
        "context": {"groupId": draw(ids()), "traits": draw(anything)},
        "integrations": draw(st.dictionaries(
            st.sampled_from(["All", "ChurnZero", "Churnzero", "HubSpot"]), anything, max_size=2
        )),
    }  # fmt: skip
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            out.pop(key, None)
        else:
            out[key] = draw(anything)
    out.update(draw(st.dictionaries(st.text(max_size=6), anything, max_size=2)))
    return out


@st.composite
def requests(draw: st.DrawFn, full: bool) -> tuple[str, bytes]:
    """(route, body): an event, a list, a batch wrapper, any JSON, or any bytes."""
    route = draw(st.sampled_from(ROUTES))
    anything = json_values(1100 if full else 200)
    items = st.lists(event_objects(full) | anything, max_size=6)
    wrapper = st.fixed_dictionaries({"batch": items, "context": anything,
                                     "integrations": anything})  # fmt: skip
    shape = event_objects(full) | items | wrapper | anything
    body = draw(st.binary(max_size=200) | shape.map(dumps))
    return route, body


def take(route: str, body: bytes) -> parsing.ParsedBody | None:
    """The parse ingest does; None for a 400. Any other exception fails the test."""
    try:
        if route == "webhook":
            return parsing.parse_webhook(body, RECEIVED)
        return parsing.parse_api(route, body, RECEIVED)
    except RequestError as exc:
        assert exc.status == 400
        return None


def items_of(parsed: parsing.ParsedBody, source: str) -> list[dict[str, Any]]:
    """What ingest queues for the accepted events."""
    return envelope.fresh(parsed.accepted, source, 0.0, map(str, itertools.count()).__next__)


def carried(route: str, body: bytes) -> int:
    """How many events a body that ingest accepts carries."""
    data = orjson.loads(body)
    if route in parsing.BATCH_ROUTES:
        return len(data["batch"])
    return len(data) if isinstance(data, list) else 1


def check_request(route: str, body: bytes) -> None:
    parsed = take(route, body)
    if parsed is None:
        return
    indices = sorted(r.index for r in parsed.rejected + parsed.refused_deletes)
    size = carried(route, body)  # no half-handled batch:
    refused = len(parsed.refused_deletes)
    assert len(parsed.accepted) + len(parsed.rejected) + refused == size
    assert indices == sorted(set(indices)) and set(indices) <= set(range(size))
    for rejected in parsed.rejected:  # what ingest writes to the dead-letter queue
        [item] = envelope.fresh([rejected.event], "api", 0.0, lambda: "x")
        deadletter.new_entry(item, Reason.INVALID_EVENT).to_json()
    check_translation(parsed, "webhook" if route == "webhook" else "api")


def check_translation(parsed: parsing.ParsedBody, source: str) -> None:
    queued = items_of(parsed, source)
    for item in queued:  # queued, parked for a retry, dead-lettered: each is serialised
        json.dumps(item)
        orjson.dumps({"id": "x", "items": [item]})
        deadletter.new_entry(item, Reason.INVALID_COMMAND).to_json()
    # A worker reads what ingest queued: every envelope decodes.
    items = [Envelope.from_json(orjson.dumps(item)) for item in queued]
    good, bad = parse_items(items)
    assert bad == [], "ingest accepted an event the worker cannot parse"
    lookup_keys(good, MAPPING)
    known = {"u:known": Known("A", "C")}
    plan = plan_batch(good, known, MAPPING)
    for _, commands in plan.send:
        assert commands
        for command in commands:
            assert command.problems() == []
    fates = (
        [i.id for i, _ in plan.send]
        + [i.id for i, _ in plan.skipped]
        + [i.id for i in plan.unresolved]
        + [i.id for i, _ in plan.invalid_event]
        + [i.id for i, _ in plan.invalid_command]
    )
    assert sorted(fates) == sorted(i.id for i in items)  # each item exactly one fate
    for name in ("send", "skipped", "unresolved", "invalid_event", "invalid_command"):
        if getattr(plan, name):
            label(f"plan has {name}")


def _event_body(**overrides: Any) -> bytes:
    base = {"type": "track", "userId": "u", "event": "Signed Up", "properties": {}}
    return dumps({**base, **overrides})


DEEP_BODY = _event_body(properties={"p": f"\x00deep{BUG_DEPTH}a"})
STORED_DEEP_BODY = _event_body(properties={"p": f"\x00deep{BUG_STORED_DEPTH}a"})
EDGE_BODY = _event_body(timestamp=BUG_TIMESTAMP)


@PROPERTIES
@given(requests(full=True))
@example(("webhook", DEEP_BODY))
@example(("track", EDGE_BODY))
@example(("webhook", STORED_DEEP_BODY))
def test_any_request_parses_or_is_a_400(request_: tuple[str, bytes]) -> None:
    check_request(*request_)


@PROPERTIES
@given(requests(full=False))
def test_any_request_parses_or_is_a_400_short_of_known_bugs(
    request_: tuple[str, bytes],
) -> None:
    check_request(*request_)


@PROPERTIES
@given(
    st.lists(event_objects(full=False), min_size=1, max_size=5), st.sampled_from(["webhook", "api"])
)
def test_accepted_batches_translate(batch: list[dict[str, Any]], source: str) -> None:
    body = dumps(batch) if source == "webhook" else dumps({"batch": batch})
    parsed = take("webhook" if source == "webhook" else "batch", body)
    assert parsed is not None
    refused = len(parsed.refused_deletes)
    assert len(parsed.accepted) + len(parsed.rejected) + refused == len(batch)
    check_translation(parsed, source)


@pytest.mark.parametrize("route", ["webhook", "track", "batch"])
def test_deeply_nested_event_is_a_400(route: str) -> None:
    event = {"type": "track", "userId": "u", "event": "E",
             "properties": {"p": f"\x00deep{BUG_DEPTH}a"}}  # fmt: skip
    body = dumps({"batch": [event]}) if route == "batch" else dumps(event)
    parsed = take(route, body)
    if parsed is not None:  # a batch may reject the one event instead
        assert parsed.accepted == [] and len(parsed.rejected) == 1
        deadletter.new_entry({"event": parsed.rejected[0].event}, Reason.INVALID_EVENT).to_json()


@pytest.mark.parametrize("stamp", [BUG_TIMESTAMP, "9999-12-31T23:59:59-01:00"])
def test_timestamp_at_the_edge_of_time_is_a_400_or_accepted(stamp: str) -> None:
    take("webhook", _event_body(timestamp=stamp))


def test_deep_event_is_refused_and_its_dead_letter_can_be_stored() -> None:
    parsed = take("batch", b'{"batch": [' + STORED_DEEP_BODY + b"]}")
    assert parsed is not None and parsed.accepted == [] and len(parsed.rejected) == 1
    assert parsed.rejected[0].errors == [
        {"field": "event", "message": f"nested deeper than {parsing.MAX_DEPTH} levels"}
    ]
    deadletter.new_entry({"event": parsed.rejected[0].event}, Reason.INVALID_EVENT).to_json()
