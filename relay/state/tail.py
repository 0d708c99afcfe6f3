"""Settlements as they happen: what `relay tail` and the admin page's live panel show.

Both read the record of settlements (`keys.TRACE`, relay.state.trace) from its end with
XREAD BLOCK, no consumer group: a tail reads, it never takes anything away, and any
number of them may follow at once. Each stream entry holds the events one settlement
delivered, skipped or dead-lettered; a `Settled` is one of those events, and a `Filter`
keeps those of one user or outcome. Entries written before the record named the user
have none: a user filter never matches them, an outcome filter still does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from relay import keys
from relay.state import trace

OUTCOMES = ("delivered", "skipped", "dead")
BLOCK_MS = 500  # one XREAD's wait: well under every client's socket timeout
COUNT = 100  # record entries per read


@dataclass(frozen=True)
class Settled:
    """One event of a settlement: when, how it ended, whose, and what was sent or why not."""

    at: float  # unix time of the settlement
    outcome: str  # delivered, skipped, dead
    message_id: str
    relay_id: str
    user: str  # userId, else anonymousId; "" when the record does not say
    event: str  # a track's name, else the call's type; "" when the record does not say
    commands: list[Any]  # the commands sent (delivered)
    reason: str  # why it was skipped or dead-lettered
    entry: str  # the dead-letter entry (dead)

    def as_dict(self) -> dict[str, Any]:
        """As JSON-ready data (`relay tail --json`, the live panel)."""
        return asdict(self)


@dataclass(frozen=True)
class Filter:
    """Which settled events to show: of this user and outcome (None: any)."""

    user: str | None = None
    outcome: str | None = None

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {self.outcome!r}")

    def __call__(self, settled: Settled) -> bool:
        """Whether `settled` passes."""
        return (self.user is None or settled.user == self.user) and (
            self.outcome is None or settled.outcome == self.outcome
        )


def parse(stream_id: bytes | str, fields: dict[Any, Any]) -> list[Settled]:
    """The events of one record entry, in the order they were settled ([] if unreadable)."""
    at = int(text_id(stream_id).split("-")[0]) / 1000
    raw = fields.get(b"v", fields.get("v"))
    try:
        events = orjson.loads(raw) if raw is not None else []
    except orjson.JSONDecodeError:
        return []
    out = []
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, list) or len(event) < 4 or event[0] not in trace.STATES:
            continue
        outcome = trace.STATES[event[0]]
        what = event[3]
        out.append(
            Settled(
                at=at, outcome=outcome, message_id=str(event[1]), relay_id=str(event[2]),
                user=str(event[5]) if len(event) > 6 else "",
                event=str(event[6]) if len(event) > 6 else "",
                commands=what if outcome == "delivered" and isinstance(what, list) else [],
                reason="" if outcome == "delivered" else str(what),
                entry=str(event[4] or "") if len(event) > 4 else "",
            )
        )  # fmt: skip
    return out


def settled_after(reply: Any, wanted: Filter) -> tuple[list[Settled], str | None]:
    """The events of an XREAD reply that pass `wanted`, and the last stream id read."""
    found: list[Settled] = []
    last: str | None = None
    for _stream, entries in reply or []:
        for stream_id, fields in entries:
            found += filter(wanted, parse(stream_id, fields))
            last = text_id(stream_id)
    return found, last


def follow(r: Any, wanted: Filter, since: str | None = None) -> Iterator[Settled]:
    """Every event settled from now on (or after stream id `since`) that passes `wanted`,
    as it is recorded; never ends (a sync Redis client)."""
    # The newest id rather than `$` in each read: what settles between two reads is kept.
    last = last_id(r) if since is None else since
    while True:
        reply = r.xread({keys.TRACE: last}, count=COUNT, block=BLOCK_MS)
        found, newest = settled_after(reply, wanted)
        if newest is not None:
            last = newest
        yield from found


def last_id(r: Any) -> str:
    """The id of the newest record entry ("0-0" when there is none): where a tail that
    must not miss what settles after this call starts."""
    newest = r.xrevrange(keys.TRACE, count=1)
    return text_id(newest[0][0]) if newest else "0-0"


def text_id(stream_id: Any) -> str:
    """A stream id as text (clients answer bytes or str)."""
    return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
