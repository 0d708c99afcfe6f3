"""The identity map: Segment userId / anonymousId -> ChurnZero account and contact.

Identify, group and alias calls (and `relay identities import`) teach it; events without
ids are resolved through it. One key per user (`relay:identity:u:<userId>`,
`relay:identity:a:<anonymousId>`, JSON `[account, contact, at, source]`: any may be null,
`at` is the event time in ms of the call that named the account, `source` where the
contact came from) that expires `identity_ttl_s` after the user's last lesson, so the
map stays the size of the active users in a Redis that must not evict. A lesson merges
into the entry (a group call sets the account and keeps the contact). A kept contact is
replaced only by an explicit contact id or an import (`resolution.FIRM_SOURCES`): two
workers that each send a first contact for a user keep the first one stored. An alias is
a link key (`relay:alias:<key>` -> the userId key it now stands for).

Tracks waiting for their user (cause `identity_wait` in the delayed set) are indexed by
user key (`relay:waiting:<key>`, a SET of delayed-set members); when the user is taught,
those members are made due now, so the mover publishes them at once. Making a member due
is `ZADD XX LT`: it never re-creates a member the mover already removed, and a member a
mover holds under its lease only comes due again, which publishes it under the same
message id (settled once, relay.delivery.claims), as an expired lease would.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from relay import keys
from relay.parked import Parked, release_items
from relay.resolution import IMPORTED, Known
from relay.state import lua
from relay.state import parking as parking_

# Merges what a batch learned into the identity map, as Known.merged does. Its KEYS and
# ARGV: relay/state/lua/identity_merge.lua.
_MERGE = lua.read("identity_merge")

# KEYS: delayed, then waiting sets. Makes every indexed member due now; returns how many.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local released = 0
for i = 2, #KEYS do
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    released = released + redis.call('ZADD', KEYS[1], 'XX', 'LT', 'CH', now, member)
  end
  redis.call('DEL', KEYS[i])
end
return released
"""


# A delete: forgets a user and every key aliased to it, and leaves tombstones. Its KEYS
# and ARGV: relay/state/lua/identity_forget.lua.
_FORGET = lua.read("identity_forget")


# KEYS: delayed, waiting set. ARGV: member, ttl_s.
_INDEX = """
for _, old in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], old) then redis.call('SREM', KEYS[2], old) end
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


@dataclass
class Lookup:
    """The map's answer for a batch: what is known, the alias links, when each deleted
    user's delete was received (tombstones), and the parked traits of the users asked."""

    known: dict[str, Known]
    links: dict[str, str]
    deleted: dict[str, float]
    parked: dict[str, Parked] = field(default_factory=dict)


def _known(raw: bytes) -> Known:
    account, contact, *rest = orjson.loads(raw)  # older entries have two or three fields
    at = rest[0] if rest and isinstance(rest[0], int) else None
    source = rest[1] if len(rest) > 1 and isinstance(rest[1], str) else None
    return Known(account or None, contact or None, at, source)


def lookup(
    r: Any, wanted: Sequence[str], everyone: Sequence[str] = (), parking: Sequence[str] = ()
) -> Lookup:
    """What is known of the `wanted` keys (`u:<userId>`, `a:<anonymousId>`) and their
    links, the tombstones of `everyone` and the parked traits of `parking`: one round
    trip, two when a link or parked traits are found."""
    # MGET needs a key: an empty list asks for one that never exists.
    pipe = r.pipeline(transaction=False)
    pipe.mget([keys.alias(k) for k in wanted] or [keys.alias("")])
    pipe.mget([keys.identity(k) for k in wanted] or [keys.identity("")])
    pipe.mget([keys.deleted(k) for k in everyone] or [keys.deleted("")])
    parking_.stage_present(pipe, parking)
    raw_links, raw_known, raw_deleted, scores = pipe.execute()
    parked = parking_.lookup(r, parking_.present_of(parking, scores))
    links = {k: v.decode() for k, v in zip(wanted, raw_links, strict=False) if v is not None}
    found = {k: _known(v) for k, v in zip(wanted, raw_known, strict=False) if v is not None}
    targets = sorted(set(links.values()) - set(wanted))
    if targets:
        more = r.mget([keys.identity(k) for k in targets])
        found.update({k: _known(v) for k, v in zip(targets, more, strict=True) if v is not None})
    deleted = {k: float(v) for k, v in zip(everyone, raw_deleted, strict=False) if v is not None}
    return Lookup(found, links, deleted, parked)


def stage_store(pipe: Any, learned: Mapping[str, Known], ttl_s: int) -> None:
    """Queue on a pipeline: merge these lessons into the map, kept `ttl_s` seconds."""
    if not learned:
        return
    names = [keys.identity(key) for key in learned]
    values = [
        v
        for k in learned.values()
        for v in (k.account or "", k.contact or "", "" if k.at is None else k.at, k.source or "")
    ]
    pipe.eval(_MERGE, len(names), *names, ttl_s, *values)


def stage_links(pipe: Any, links: Mapping[str, str], ttl_s: int) -> None:
    """Queue on a pipeline: each key now stands for its alias target."""
    for key, target in links.items():
        pipe.set(keys.alias(key), target, ex=ttl_s)
        pipe.sadd(keys.aliased(target), key)
        pipe.expire(keys.aliased(target), ttl_s)


def stage_forget(pipe: Any, forgotten: Mapping[str, float], tombstone_s: int) -> None:
    """Queue on a pipeline: forget these users (received-at of their delete) and the
    keys aliased to them: entries, links, the contact's attribute clock, parked traits
    (the users' own), and a tombstone
    that drops their events received before the delete; their waiting tracks come due
    now (to be dropped)."""
    prefixes = [keys.IDENTITY, keys.ALIAS, keys.ALIASED, keys.WAITING, keys.DELETED,
                keys.ATTRIBUTE_CLOCK]  # fmt: skip
    for key, received_at in forgotten.items():
        pipe.eval(_FORGET, 1, keys.DELAYED, *prefixes, key, received_at, tombstone_s)
    parking_.stage_drop(pipe, forgotten, keys.Stat.PARKED.of("deleted"))


def stage_waiting(pipe: Any, member: bytes, user_keys: Iterable[str], ttl_s: float) -> None:
    """Queue on a pipeline: index a delayed-set member under the users it waits for
    (dropping members the mover has moved since, so a track retried many times is not
    indexed many times)."""
    for key in sorted(set(user_keys)):
        pipe.eval(_INDEX, 2, keys.DELAYED, keys.waiting(key), member, max(int(ttl_s), 1))


def stage_release(pipe: Any, user_keys: Iterable[str]) -> None:
    """Queue on a pipeline: these users' waiting tracks come due now."""
    names = [keys.waiting(key) for key in sorted(set(user_keys))]
    if names:
        pipe.eval(_RELEASE, 1 + len(names), keys.DELAYED, *names)


def seed(r: Any, entries: Mapping[str, Known], ttl_s: int, chunk: int = 1000) -> int:
    """Merge imported identities into the map (theirs win) and release the tracks
    waiting for those users; returns how many waiting batches came due."""
    released = 0
    # An import names the contact outright: it replaces the one kept.
    items = [
        (key, replace(k, source=IMPORTED if k.contact else None)) for key, k in entries.items()
    ]
    for start in range(0, len(items), chunk):
        part = dict(items[start : start + chunk])
        # Their parked traits go out too (read first; only what was read is taken).
        found = lookup(r, (), (), list(part)).parked
        now = time.time()
        releases = {u: (p, release_items(u, p, now)) for u, p in found.items()}
        pipe = r.pipeline(transaction=True)
        stage_store(pipe, part, ttl_s)
        parking_.stage_release(pipe, releases, keys.Stat.PARKED.of("released"))
        stage_release(pipe, part)
        released += int(pipe.execute()[-1])
    return released


_SOURCES = {
    "contactExternalId": "an explicit contactExternalId (may move the user)",
    IMPORTED: "relay identities import (may move the user)",
}


def _contact_from(known: Known) -> str | None:
    """Where the contact the relay uses for the user came from, in words."""
    if known.contact is None:
        return None
    if known.source is None:
        return "unknown (kept by an earlier version)"
    named = _SOURCES.get(known.source)
    return named or f"the first contact sent for the user (by {known.source}); kept"


def describe(r: Any, user_id: str) -> dict[str, Any]:
    """Everything the map holds about an id, as a userId and as an anonymousId."""
    out: dict[str, Any] = {}
    for key in ("u:" + user_id, "a:" + user_id):
        raw = r.get(keys.identity(key))
        link = r.get(keys.alias(key))
        waiting = r.scard(keys.waiting(key))
        deleted = r.get(keys.deleted(key))
        parked = parking_.describe(r, key)
        if raw is None and link is None and not waiting and deleted is None and not parked:
            continue
        entry: dict[str, Any] = {}
        if deleted is not None:
            entry["deleted_at"] = float(deleted)
        if raw is not None:
            known = _known(raw)
            entry.update(account=known.account, contact=known.contact,
                         contact_from=_contact_from(known), account_named_at_ms=known.at,
                         expires_in_s=r.ttl(keys.identity(key)))  # fmt: skip
        if link is not None:
            entry["alias_of"] = link.decode()
        if waiting:
            entry["waiting_batches"] = waiting
        if parked:
            entry["parked_traits"] = parked
        out[key] = entry
    return out
