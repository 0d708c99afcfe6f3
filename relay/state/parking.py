"""Parked traits in Redis (relay.parked says what is parked and released, and why).

One HASH per user key (`relay:parked:<key>`: trait -> `<event ms>|<JSON value>`, the
newest value per trait by event time), indexed by expiry in `relay:parking:index` (user
key -> when its traits expire, `identity_ttl_s` after the user's last parked identify),
and the number of traits parked now in `relay:parking:traits` (the
`relay_parked_attributes` gauge). Every change goes through a script here, so the count
stays the sum of the hashes.

- A worker parks in its settlement's MULTI (`stage_park`).
- `lookup` reads the parked traits of the users a batch may teach, folded into the
  identity lookup's round trip: one ZMSCORE there, and a HGETALL only for users that
  have some (a second round trip, rare once the audience has synced).
- `stage_release` (the settlement's MULTI, or an import's) schedules the release items
  due now in the delayed set and removes the values it read (a newer one parked
  meanwhile stays parked).
- `expire_due` (every worker's mover, now and then) drops what expired, counted;
  a delete drops a user's (relay.state.identity).
- A user parked after another batch gave them an account (the worker read the map
  before) is flagged in `relay:parking:known`; `release_known` (the mover, now and then)
  releases those.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from relay import keys
from relay.envelope import Envelope
from relay.parked import Parked, release_items
from relay.reasons import Deferral
from relay.state import lua

# Kept this much past the index's expiry, so the sweep (which counts) drops a hash before
# Redis does; if no worker sweeps, Redis still frees it.
HASH_GRACE_S = 86_400
SWEEP_LIMIT = 500  # users dropped per sweep call

# Parks an identify's traits for a user with no account yet (newer value per trait). Its
# KEYS and ARGV: relay/state/lua/parking_park.lua.
_PARK = lua.read("parking_park")

# KEYS: hash, index, count, stats. ARGV: user key, the stats field, then (trait, event
# ms) per value read: removes each value not newer than the one read; returns how many.
_TAKE = """
local removed = 0
for i = 3, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and tonumber(string.match(v, '^(%d+)|')) <= tonumber(ARGV[i + 1]) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
redis.call('DECRBY', KEYS[3], removed)
if removed > 0 then redis.call('HINCRBY', KEYS[4], ARGV[2], removed) end
return removed
"""

# Drops the parked traits of some users, or of those whose time is up. Its KEYS and ARGV:
# relay/state/lua/parking_drop.lua.
_DROP = lua.read("parking_drop")


def stage_park(pipe: Any, user: str, traits: Mapping[str, tuple[int, Any]], ttl_s: int) -> None:
    """Queue on a pipeline: park a user's traits (trait -> (event ms, value)), the newer
    value per trait kept, for `ttl_s` from now."""
    if not traits:
        return
    args: list[Any] = [user, time.time() + ttl_s, ttl_s + HASH_GRACE_S,
                       keys.Stat.PARKED.of("parked")]  # fmt: skip
    for trait, (ms, value) in traits.items():
        args += [trait, ms, orjson.dumps(value)]
    names = [keys.parked(user), keys.PARKING_INDEX, keys.PARKING_TRAITS, keys.STATS,
             keys.identity(user), keys.PARKING_KNOWN]  # fmt: skip
    pipe.eval(_PARK, len(names), *names, *args)


def lookup(r: Any, present: Sequence[str]) -> dict[str, Parked]:
    """The parked traits of these users (those `stage_present` found with some)."""
    if not present:
        return {}
    pipe = r.pipeline(transaction=False)
    for user in present:
        pipe.hgetall(keys.parked(user))
    out: dict[str, Parked] = {}
    for user, raw in zip(present, pipe.execute(), strict=True):
        if raw:
            out[user] = {_text(t): _value(v) for t, v in raw.items()}
    return out


def stage_present(pipe: Any, users: Sequence[str]) -> None:
    """Queue on a pipeline: which of these users have parked traits (ZMSCORE; with no
    users, a command that answers nothing)."""
    pipe.zmscore(keys.PARKING_INDEX, list(users) or [""])


def present_of(users: Sequence[str], scores: list[Any]) -> list[str]:
    """The users `stage_present` found with parked traits, from its answer."""
    return [u for u, score in zip(users, scores, strict=False) if score is not None]


def stage_release(
    pipe: Any, releases: Mapping[str, tuple[Parked, list[Envelope]]], stats_field: str
) -> None:
    """Queue on a pipeline: each user's release items come due now in the delayed set,
    and the parked values they carry are removed (`stats_field` counts them)."""
    for user, (parked, items) in releases.items():
        _stage_due_now(pipe, items)
        args: list[Any] = [user, stats_field]
        for trait, (ms, _) in parked.items():
            args += [trait, ms]
        names = [keys.parked(user), keys.PARKING_INDEX, keys.PARKING_TRAITS, keys.STATS]
        pipe.eval(_TAKE, len(names), *names, *args)


def stage_drop(pipe: Any, users: Iterable[str], stats_field: str) -> None:
    """Queue on a pipeline: drop these users' parked traits (a delete), counted."""
    users = sorted(users)
    if users:
        names = [keys.PARKING_INDEX, keys.PARKING_TRAITS, keys.STATS]
        pipe.eval(_DROP, len(names), *names, keys.PARKED, stats_field, 0, *users)


def expire_due(r: Any) -> int:
    """Drop the parked traits of users whose time ran out (at most SWEEP_LIMIT users);
    returns the traits dropped, counted as `parked:expired`."""
    names = [keys.PARKING_INDEX, keys.PARKING_TRAITS, keys.STATS]
    expired = keys.Stat.PARKED.of("expired")
    return int(r.eval(_DROP, len(names), *names, keys.PARKED, expired, SWEEP_LIMIT))


def release_known(r: Any) -> int:
    """Release the parked traits of users who had an account by the time they were parked
    (a race between two batches); returns the users released."""
    users = [_text(u) for u in r.spop(keys.PARKING_KNOWN, SWEEP_LIMIT) or []]
    found = lookup(r, users)
    if found:
        now = time.time()
        releases = {u: (p, release_items(u, p, now)) for u, p in found.items()}
        pipe = r.pipeline(transaction=True)
        stage_release(pipe, releases, keys.Stat.PARKED.of("released"))
        pipe.execute()
    return len(found)


def counts(r: Any) -> dict[str, int]:
    """Users with parked traits, and the traits parked now."""
    pipe = r.pipeline(transaction=False)
    pipe.zcard(keys.PARKING_INDEX)
    pipe.get(keys.PARKING_TRAITS)
    users, traits = pipe.execute()
    return {"users": int(users), "traits": max(int(traits or 0), 0)}


def describe(r: Any, user: str) -> dict[str, Any]:
    """A user's parked traits (trait -> value and event ms), for `relay identities show`."""
    raw = r.hgetall(keys.parked(user))
    return {
        _text(t): {"value": value, "event_ms": ms}
        for t, v in sorted(raw.items())
        for ms, value in [_value(v)]
    }


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _value(raw: bytes | str) -> tuple[int, Any]:
    ms, _, value = _text(raw).partition("|")
    return int(ms), orjson.loads(value)


def _stage_due_now(pipe: Any, items: list[Envelope]) -> None:
    # The member as relay.delivery.delayed writes it, so the mover publishes it at once.
    if items:
        stored = [item.to_dict() for item in items]
        member = orjson.dumps({"id": uuid.uuid4().hex, "items": stored, "cause": Deferral.PARKED})
        pipe.zadd(keys.DELAYED, {member: time.time()})
        pipe.incrby(keys.DELAYED_EVENTS, len(items))
