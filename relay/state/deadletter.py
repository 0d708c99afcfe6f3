"""The dead-letter queue: every event the relay could not deliver, with why.

One store for every reason. An entry is one event, a `DeadLetter`, stored as JSON::

    {"id", "reason", "item" (the queued item: relay id, source, event),
     "errors", "status", "response", "attempts", "first_failure", "last_failure"}

The JSON is the contract with entries written by earlier versions: a field added must be
optional, and a `Reason` once written is never renamed. Replay and purge act on a
`Selection` (ids, or all entries or one reason's, within a time window), which the CLI
and the admin API both build with `select`.

Layout (keys.py): a HASH id -> JSON entry, a ZSET of ids by last failure time and one
ZSET per reason, so a page of entries or one entry is a couple of O(log n) calls at a
million entries.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, fields
from typing import Any

import orjson
import redis

from relay import keys
from relay.envelope import Envelope, Json
from relay.errors import DecodeError
from relay.reasons import Reason
from relay.state import broker

CLAIM_S = 300  # a replay's hold on an entry; a crashed replay frees it after this


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry: one event (its queued item) and why it was not delivered."""

    id: str
    reason: Reason
    item: dict[str, Any]  # the queued item: relay id, source, attempts, event...
    errors: list[Any]  # field errors, command problems, a worker's exception
    status: int | None  # ChurnZero's answer, when it gave one
    response: str | None  # an excerpt of that answer, or why nothing was sent
    attempts: int
    first_failure: float
    last_failure: float

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data, in the stored JSON's shape."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"reason": self.reason.value}

    def to_json(self) -> bytes:
        """The entry as stored."""
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        """The entry stored as `raw`; DecodeError if it is not one the relay writes."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"a dead letter is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DecodeError("a dead letter is not a JSON object")
        wrong = [
            name
            for name, kinds in _FIELD_TYPES.items()
            if not isinstance(data.get(name, ...), kinds)
        ]
        if wrong:
            raise DecodeError(f"dead letter {data.get('id')!r}: bad or missing {', '.join(wrong)}")
        try:
            reason = Reason(data["reason"])
        except ValueError:
            raise DecodeError(
                f"dead letter {data['id']!r}: unknown reason {data['reason']!r}"
            ) from None
        return cls(**{name: data[name] for name in _FIELD_TYPES} | {"reason": reason})


# What each stored field may hold; numbers are kept as read, so the JSON comes out as it went in.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "reason": str,
    "item": dict,
    "errors": list,
    "status": (int, type(None)),
    "response": (str, type(None)),
    "attempts": int,
    "first_failure": (int, float),
    "last_failure": (int, float),
}


def new_entry(
    item: dict[str, Any],
    reason: Reason,
    *,
    errors: list[Any] | None = None,
    status: int | None = None,
    response: str | None = None,
    now: float | None = None,
    entry_id: str | None = None,
) -> DeadLetter:
    """A dead-letter entry for one queued item (or raw rejected event wrapped as one)."""
    now = time.time() if now is None else now
    return DeadLetter(
        id=entry_id or uuid.uuid4().hex,
        reason=reason,
        item=item,
        errors=errors or [],
        status=status,
        response=(response or "")[:500] or None,
        attempts=attempts if isinstance(attempts := item.get("attempts"), int) else 0,
        first_failure=item.get("first_failure") or now,
        last_failure=now,
    )


def entry_id_of(event: Any) -> str:
    """An entry id made from an event's content: the same event sent again gets the same
    entry, not a second one."""
    try:
        content = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return uuid.uuid4().hex  # not JSON as it stands: no content to recognise it by
    return hashlib.blake2b(content, digest_size=16).hexdigest()


def stage_add(pipe: Any, entries: list[DeadLetter]) -> None:
    """Queue the writes of `entries` on a (sync or asyncio) Redis pipeline."""
    if not entries:
        return
    pipe.hset(keys.DLQ_ENTRIES, mapping={e.id: e.to_json() for e in entries})
    pipe.zadd(keys.DLQ_INDEX, {e.id: e.last_failure for e in entries})
    by_reason: dict[Reason, dict[str, float]] = {}
    for e in entries:
        by_reason.setdefault(e.reason, {})[e.id] = e.last_failure
    for reason, members in by_reason.items():
        pipe.zadd(keys.dlq_reason(reason), members)
        pipe.hincrby(keys.STATS, keys.Stat.DEAD_LETTERS.of(reason), len(members))


def add(r: redis.Redis, entries: list[DeadLetter]) -> None:
    """Store entries in one round trip."""
    pipe = r.pipeline(transaction=True)
    stage_add(pipe, entries)
    pipe.execute()


def _range(
    reason: Reason | None, since: float | None, until: float | None
) -> tuple[str, float | str, float | str]:
    """The index to read and its score bounds for these filters."""
    index = keys.dlq_reason(reason) if reason else keys.DLQ_INDEX
    return index, "-inf" if since is None else since, "+inf" if until is None else until


def _strings(ids: list[Any]) -> list[str]:
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def list_ids(
    r: redis.Redis,
    *,
    reason: Reason | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[str]:
    """Ids of entries, newest failure first."""
    index, low, high = _range(reason, since, until)
    return _strings(r.zrevrangebyscore(index, high, low, start=offset, num=limit))


def get_many(r: redis.Redis, ids: list[str]) -> list[DeadLetter]:
    """The entries with these ids (missing ones left out); DecodeError on a bad one."""
    if not ids:
        return []
    raw = r.hmget(keys.DLQ_ENTRIES, ids)
    return [DeadLetter.from_json(v) for v in raw if v is not None]


def list_entries(r: redis.Redis, **filters: Any) -> list[DeadLetter]:
    """A page of entries, newest first (filters as `list_ids`)."""
    return get_many(r, list_ids(r, **filters))


def get(r: redis.Redis, entry_id: str) -> DeadLetter | None:
    """One entry, or None."""
    found = get_many(r, [entry_id])
    return found[0] if found else None


def remove(r: redis.Redis, entries: list[DeadLetter]) -> int:
    """Delete these entries; returns how many were there."""
    if not entries:
        return 0
    pipe = r.pipeline(transaction=True)
    ids = [e.id for e in entries]
    pipe.hdel(keys.DLQ_ENTRIES, *ids)
    pipe.zrem(keys.DLQ_INDEX, *ids)
    for e in entries:
        pipe.zrem(keys.dlq_reason(e.reason), e.id)
    return int(pipe.execute()[0])


def count(
    r: redis.Redis, *, reason: Reason | None = None, since: float | None = None,
    until: float | None = None,
) -> int:  # fmt: skip
    """How many entries match the filters."""
    index, low, high = _range(reason, since, until)
    return int(r.zcount(index, low, high))


class SelectionError(ValueError):
    """A selection of ids and of all entries or a reason at once (`mixed`), or of nothing."""

    def __init__(self, *, mixed: bool) -> None:
        super().__init__("ids, or all / a reason, not both" if mixed else "ids, all or a reason")
        self.mixed = mixed


@dataclass(frozen=True)
class Selection:
    """The dead letters a replay or purge acts on: these ids, or every entry (of one
    reason) that last failed between `since` and `until` (unbounded when None)."""

    ids: tuple[str, ...] = ()
    reason: Reason | None = None
    since: float | None = None
    until: float | None = None

    def count(self, r: redis.Redis) -> int:
        """How many entries are selected (ids counted as given)."""
        if self.ids:
            return len(self.ids)
        return count(r, reason=self.reason, since=self.since, until=self.until)

    def oldest(self, r: redis.Redis, n: int) -> list[str]:
        """The ids of the `n` selected entries that failed first (of ids: the first n);
        what a bulk action in steps takes next, as each step removes what it acted on."""
        if self.ids:
            return list(self.ids[:n])
        index, low, high = _range(self.reason, self.since, self.until)
        return _strings(r.zrangebyscore(index, low, high, start=0, num=n))

    def pages(self, r: redis.Redis, size: int = 500) -> Generator[list[str], None, None]:
        """Pages of the selected ids, oldest failure first.

        Pages come from a snapshot of the index taken at the start, so removing entries
        while iterating (replay, purge) neither skips nor repeats any.
        """
        if self.ids:
            yield list(self.ids)
            return
        snapshot = f"{keys.DLQ_SNAPSHOT}{uuid.uuid4().hex}"
        index, low, high = _range(self.reason, self.since, self.until)
        total = r.zrangestore(snapshot, index, low, high, byscore=True)
        r.expire(snapshot, 3600)
        try:
            for start in range(0, int(total), size):
                yield _strings(r.zrange(snapshot, start, start + size - 1))
        finally:
            r.delete(snapshot)


def select(
    ids: Iterable[str] = (),
    *,
    every: bool = False,
    reason: Reason | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Selection:
    """An operator's selection: entry ids, or `every` entry or those of `reason` (within
    the time window, which ids ignore). SelectionError for both, or for neither."""
    ids = tuple(ids)
    if ids and (every or reason):
        raise SelectionError(mixed=True)
    if ids:
        return Selection(ids)
    if not every and not reason:
        raise SelectionError(mixed=False)
    return Selection(reason=reason, since=since, until=until)


def replay_item(entry: DeadLetter, now: float) -> Envelope:
    """The envelope a replay of this entry queues (a dry run previews the same); its
    event is parsed again from scratch, so a relaxed rule may take it now. Raises
    DecodeError when the entry's item is not an envelope (a worker_error of a message
    the relay did not write)."""
    return Envelope.from_dict(entry.item).replayed(entry.id, now)


# KEYS: the queue, the ready count, the entries, their index, the stats, then each entry's
# reason index. ARGV: events, the stats field of replays, the entry count n, the n entry
# ids, then the messages. Queues the messages and removes their entries in one step, or
# (an entry is gone: purged, or replayed by a call whose reply was lost) does nothing.
_REPLAY = """
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.call('HEXISTS', KEYS[3], ARGV[3 + i]) == 0 then return 0 end
end
for i = 1, n do
  redis.call('HDEL', KEYS[3], ARGV[3 + i])
  redis.call('ZREM', KEYS[4], ARGV[3 + i])
  redis.call('ZREM', KEYS[5 + i], ARGV[3 + i])
end
for i = 4 + n, #ARGV do redis.call('LPUSH', KEYS[1], ARGV[i]) end
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[2], ARGV[1])
return 1
"""


def replay(
    r: redis.Redis, ids: list[str], queue: broker.Queue, per_message: int | None = None
) -> int:
    """Re-enqueue these entries through the normal path (in messages of at most
    `per_message` events), removing them in the same step.

    Safe to run twice, even at once: each entry is claimed before it is published, and
    an entry is queued and removed together, so a replay whose reply was lost (its
    caller saw an error and tries again) finds it gone rather than queuing it twice.
    Entries whose item is not an envelope stay where they are. Returns how many were
    replayed.
    """
    pipe = r.pipeline(transaction=False)
    for entry_id in ids:
        pipe.set(keys.DLQ_REPLAYING + entry_id, b"1", nx=True, ex=CLAIM_S)
    claimed = [entry_id for entry_id, won in zip(ids, pipe.execute(), strict=True) if won]
    replayed = 0
    try:
        # Again with the entries still there when one vanished meanwhile (a purge).
        while entries := get_many(r, claimed):
            now = time.time()
            items = []
            for entry in list(entries):
                try:
                    items.append(replay_item(entry, now).to_dict())
                except DecodeError:
                    entries.remove(entry)
            if not items:
                break
            if _queue_replayed(r, queue, entries, items, per_message):
                replayed = len(items)
                break
    finally:
        # Released whatever happened: a failed publish leaves the entries replayable.
        if claimed:
            r.delete(*(keys.DLQ_REPLAYING + i for i in claimed))
    return replayed


def _queue_replayed(
    r: redis.Redis, queue: broker.Queue, entries: list[DeadLetter], items: list[Json],
    per_message: int | None,
) -> bool:  # fmt: skip
    name, messages = queue.messages(items, per_message)
    ids = [e.id for e in entries]
    found = r.register_script(_REPLAY)(
        keys=[name, keys.DEPTH_READY, keys.DLQ_ENTRIES, keys.DLQ_INDEX, keys.STATS,
              *(keys.dlq_reason(e.reason) for e in entries)],
        args=[len(items), keys.Stat.REPLAYED, len(ids), *ids, *messages],
    )  # fmt: skip
    return bool(found)


def remove_users(r: redis.Redis, user_keys: set[str]) -> int:
    """Delete every entry whose event is of these users (`u:<userId>`, `a:<anonymousId>`);
    returns how many. A scan of the whole queue: for the rare user deletion."""
    found = []
    for _, raw in r.hscan_iter(keys.DLQ_ENTRIES, count=500):
        entry = DeadLetter.from_json(raw)
        event = entry.item.get("event")
        if isinstance(event, dict) and _user_keys(event) & user_keys:
            found.append(entry)
    return remove(r, found)


def _user_keys(event: dict[str, Any]) -> set[str]:
    out = set()
    for field, prefix in (("userId", "u:"), ("anonymousId", "a:")):
        value = event.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            out.add(prefix + str(value))
    return out


def purge(r: redis.Redis, ids: list[str]) -> int:
    """Delete the entries with these ids; returns how many were there."""
    return remove(r, get_many(r, ids))


def export(
    r: redis.Redis, write: Callable[[bytes], Any], *, reason: Reason | None = None,
    since: float | None = None, until: float | None = None,
) -> int:  # fmt: skip
    """Write every matching entry (last failed between `since` and `until`) as a JSON
    line, oldest first; returns the count."""
    written = 0
    for ids in Selection(reason=reason, since=since, until=until).pages(r):
        for entry in get_many(r, ids):
            write(entry.to_json() + b"\n")
            written += 1
    return written
