"""A guard on new ChurnZero names: event types and attribute fields.

ChurnZero creates an event type or a field for any new name it is sent, silently, so a
typo or a renamed trait becomes clutter in the customer's ChurnZero. The relay remembers
the names it has sent (a SET per kind, at most `names_max` each) and:

- counts a name it has never sent (`relay_new_names_total{kind}`) and lists it (the
  newest `LISTED` new names, for `relay status`, `relay names list` and the admin page);
- with `RELAY_NEW_NAMES=hold`, dead-letters an event that would send a new name
  (reason `new_name`) until an operator allows it (`relay names allow NAME`), then
  replays it.

Kinds: `event` (trackEvent's eventName), `account_attribute` and `contact_attribute`
(setAttribute's or incrementAttribute's name on that entity: ChurnZero's account and
contact fields are apart).
A full set remembers no more names (each further one counts as new every time it is
sent, and in hold mode is held) until names are allowed or the limit raised.
"""

from __future__ import annotations

import time
from typing import Any

from relay import keys
from relay.commands import Command, IncrementAttribute, SetAttribute, TrackEvent
from relay.envelope import Envelope
from relay.state import lua

KINDS = ("event", "account_attribute", "contact_attribute")
LISTED = 200  # new names kept for listing, per deployment
Name = tuple[str, str]  # kind, name

# Remembers, counts and lists the names of one kind sent for the first time. Its KEYS and
# ARGV: relay/state/lua/names_learn.lua.
_LEARN = lua.read("names_learn")

# KEYS: held zset, stats. ARGV: now, then kind, name, the kind's stats field triples.
# Lists each name as held, and counts it as new the first time it is held (a name held
# again is not counted again).
_HOLD = """
for i = 2, #ARGV, 3 do
  local member = ARGV[i] .. ':' .. ARGV[i + 1]
  if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], member) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 2], 1)
  end
end
return 0
"""


def names_of(commands: list[Command]) -> set[Name]:
    """The ChurnZero names these commands would send."""
    out: set[Name] = set()
    for command in commands:
        if isinstance(command, TrackEvent):
            out.add(("event", command.event_name))
        elif isinstance(command, SetAttribute | IncrementAttribute):
            out.add((f"{command.entity}_attribute", command.name))
    return out


def unknown(r: Any, wanted: set[Name]) -> set[Name]:
    """Which of these names the relay has never sent (one round trip, read-only)."""
    if not wanted:
        return set()
    ordered = sorted(wanted)
    pipe = r.pipeline(transaction=False)
    for kind, name in ordered:
        pipe.sismember(keys.names(kind), name)
    return {n for n, known in zip(ordered, pipe.execute(), strict=True) if not known}


def sent_names(send: list[tuple[Envelope, list[Command]]]) -> set[Name]:
    """Every name the commands of these events would send."""
    return {name for _, commands in send for name in names_of(commands)}


def to_hold(
    send: list[tuple[Envelope, list[Command]]],
    new: set[Name],
    exempt: set[str] | frozenset[str] = frozenset(),
) -> dict[str, list[Name]]:
    """The events that would send a name in `new`, by relay id, with those names (for
    `relay.plan.holding`). `exempt`: relay ids an earlier run of the message already
    delivered (they are settled as delivered, not held)."""
    out = {}
    for item, commands in send:
        fresh = sorted(names_of(commands) & new)
        if fresh and item.id not in exempt:
            out[item.id] = fresh
    return out


def note(name: Name) -> str:
    """Why an event is held for a name (`new contact attribute name: Seats`)."""
    kind, text = name
    return f"new {kind.replace('_', ' ')} name: {text}"


class Names:
    """The remembered names of one deployment (sync Redis client)."""

    def __init__(self, r: Any, *, max_per_kind: int) -> None:
        self._redis = r
        self._max = max_per_kind
        self._learn = r.register_script(_LEARN)
        self._hold = r.register_script(_HOLD)

    def stage_held(self, pipe: Any, held: set[Name]) -> None:
        """Queue on the settlement's MULTI: list the held names (counted once each)."""
        if held:
            args: list[Any] = [time.time()]
            for kind, name in sorted(held):
                args += [kind, name, keys.Stat.NEW_NAMES.of(kind)]
            self._hold(keys=[keys.NAMES_HELD, keys.STATS], args=args, client=pipe)

    def stage_learn(self, pipe: Any, sent: set[Name]) -> None:
        """Queue on the settlement's MULTI: these names were sent; count the new ones."""
        now = time.time()
        for kind in KINDS:
            names = sorted(n for k, n in sent if k == kind)
            if names:
                self._learn(
                    keys=[keys.names(kind), keys.STATS, keys.NAMES_NEW],
                    args=[kind, self._max, now, LISTED, keys.Stat.NEW_NAMES.of(kind), *names],
                    client=pipe,
                )


def allow(r: Any, name: str, kind: str | None = None) -> list[str]:
    """Remember NAME as sent (in `kind`, or in every kind it is held in); returns the
    kinds it was allowed in, empty when it is held nowhere and no kind was given."""
    held = {m.decode() if isinstance(m, bytes) else m for m in r.zrange(keys.NAMES_HELD, 0, -1)}
    kinds = [kind] if kind else [k for k in KINDS if f"{k}:{name}" in held]
    if not kinds:
        return []
    pipe = r.pipeline(transaction=True)
    for k in kinds:
        pipe.sadd(keys.names(k), name)
        pipe.zrem(keys.NAMES_HELD, f"{k}:{name}")
    pipe.execute()
    return kinds


def report(r: Any, limit: int = 20) -> dict[str, Any]:
    """Known names per kind, the newest new names and the names held, for status."""
    pipe = r.pipeline(transaction=False)
    for kind in KINDS:
        pipe.scard(keys.names(kind))
    pipe.zrevrange(keys.NAMES_NEW, 0, limit - 1, withscores=True)
    pipe.zrevrange(keys.NAMES_HELD, 0, -1, withscores=True)
    *known, new, held = pipe.execute()

    def listed(rows: list[tuple[bytes, float]]) -> list[dict[str, Any]]:
        out = []
        for member, at in rows:
            kind, _, name = member.decode().partition(":")
            out.append({"kind": kind, "name": name, "at": at})
        return out

    return {
        "known": dict(zip(KINDS, (int(k) for k in known), strict=True)),
        "new": listed(new),
        "held": listed(held),
    }
