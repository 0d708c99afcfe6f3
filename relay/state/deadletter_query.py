"""Finding dead letters the way an operator names them: an id or a unique prefix of one,
the entries of one user, event or messageId, and a tally of a selection by reason and
event (the dry-run summary of a bulk replay or purge).

Reads only. Filters by content scan the index newest first and decode each entry: an
operator's tool, O(entries looked at), never on the delivery path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from relay import keys
from relay.reasons import Reason
from relay.state import deadletter
from relay.state.deadletter import DeadLetter

PAGE = 500
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class UnknownId(LookupError):
    """No dead letter has this id, nor an id starting with it."""

    def __init__(self, given: str) -> None:
        super().__init__(f"no dead letter {given} (nor one whose id starts with it)")
        self.given = given


class AmbiguousId(LookupError):
    """More than one dead letter's id starts with this prefix."""

    def __init__(self, given: str, candidates: list[str]) -> None:
        shown = ", ".join(candidates[:10]) + (", …" if len(candidates) > 10 else "")
        super().__init__(
            f"{given} is the start of {len(candidates)} dead letters' ids ({shown}): "
            "give more of the id"
        )
        self.given = given
        self.candidates = candidates


def resolve(r: Any, given: str) -> str:
    """The full id of the one entry whose id is `given` or starts with it; UnknownId or
    AmbiguousId otherwise."""
    if not given:
        raise UnknownId(given)
    if r.hexists(keys.DLQ_ENTRIES, given):
        return given
    pattern = given.translate(_GLOB) + "*"
    found = sorted({_text(k) for k, _ in r.hscan_iter(keys.DLQ_ENTRIES, match=pattern, count=PAGE)})
    if not found:
        raise UnknownId(given)
    if len(found) > 1:
        raise AmbiguousId(given, found)
    return found[0]


def resolve_all(r: Any, given: Iterable[str]) -> list[str]:
    """`resolve` for each; the first unknown or ambiguous one raises, before anything is done."""
    return list(dict.fromkeys(resolve(r, g) for g in given))


@dataclass(frozen=True)
class Match:
    """Entries of this user (userId or anonymousId), event (a track's name or the call's
    type) and messageId; None matches any."""

    user: str | None = None
    event: str | None = None
    message_id: str | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.user, self.event, self.message_id))

    def __call__(self, entry: DeadLetter) -> bool:
        """Whether `entry` is one of those wanted."""
        event = entry.item.get("event")
        if not isinstance(event, dict):
            return not self
        if self.user is not None and self.user not in (
            _text(event.get("userId")), _text(event.get("anonymousId"))
        ):  # fmt: skip
            return False
        if self.event is not None and self.event != event_name(event):
            return False
        return self.message_id is None or self.message_id == _text(event.get("messageId"))


def event_name(event: Any) -> str:
    """A track's name, else the call's type ("?" for what is neither)."""
    if not isinstance(event, dict):
        return "?"
    name = event.get("event") if event.get("type") == "track" else None
    return str(name or event.get("type") or "?")


def newest(
    r: Any, match: Callable[[DeadLetter], bool], *, reason: Reason | None = None,
    since: float | None = None, until: float | None = None, limit: int = 20, offset: int = 0,
) -> tuple[list[DeadLetter], int | None]:  # fmt: skip
    """A page of the matching entries, newest failure first, after skipping `offset` of
    them; and the offset of the next page (None when this was the last)."""
    found: list[DeadLetter] = []
    skipped = 0
    for entry in _scan(r, reason, since, until):
        if not match(entry):
            continue
        if skipped < offset:
            skipped += 1
            continue
        if len(found) == limit:
            return found, offset + limit
        found.append(entry)
    return found, None


def _scan(
    r: Any, reason: Reason | None, since: float | None, until: float | None
) -> Iterator[DeadLetter]:
    start = 0
    while True:
        ids = deadletter.list_ids(
            r, reason=reason, since=since, until=until, limit=PAGE, offset=start
        )
        yield from deadletter.get_many(r, ids)
        if len(ids) < PAGE:
            return
        start += PAGE


@dataclass
class Tally:
    """A selection counted by reason and by event."""

    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_event: Counter[str] = field(default_factory=Counter)

    def add(self, entries: Iterable[DeadLetter]) -> None:
        """Count these entries too."""
        for entry in entries:
            self.total += 1
            self.by_reason[entry.reason.value] += 1
            self.by_event[event_name(entry.item.get("event"))] += 1

    def counting(self, pages: Iterable[list[DeadLetter]]) -> Iterator[list[DeadLetter]]:
        """`pages`, passed through and counted (so a dry run reads them once)."""
        for page in pages:
            self.add(page)
            yield page

    def as_dict(self) -> dict[str, Any]:
        """The counts, largest first, as JSON-ready data."""
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason.most_common()),
            "by_event": dict(self.by_event.most_common()),
        }


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None or isinstance(value, bool) else str(value)
