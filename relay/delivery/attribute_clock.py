"""Out-of-order protection: an attribute write from an older event is not sent.

ChurnZero's setAttribute is last-write-wins with no feedback, so a retried, replayed,
late or clock-corrected identify would silently overwrite newer data. For each
(entity, attribute) the relay keeps the event time of the last value it let through:
one HASH per entity (`relay:attrclock:a:<account>` or `relay:attrclock:c:<account>:
<contact>`, the account's length in bytes first), attribute name -> event time in epoch ms,
expiring `attribute_clock_ttl_s` after its last write.

The check reserves before sending, in one script: a write whose event is at least as new
as the one kept moves the clock forward and goes out; an older one is skipped
(`stale_attribute`). Reserving first leaves no window in which two workers both send
values of different ages. The cost: a newer value that then fails for good (dead
letter) still holds the clock, so older values wait behind it until it is replayed.
Track events (trackEvent) and increments are history, never skipped for age.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from relay import keys
from relay.commands import SetAttribute
from relay.memory import ContactChange
from relay.plan import Parsed, Plan
from relay.resolution import Ids
from relay.state import oom

# KEYS: one entity hash per write. ARGV: ttl_s, then (attribute, event ms) per write.
# Returns 1 (send) or 0 (stale) per write, in order.
_RESERVE = """
local out = {}
for i, key in ipairs(KEYS) do
  local name, stamp = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local kept = tonumber(redis.call('HGET', key, name) or '-1')
  if stamp >= kept then
    if stamp > kept then redis.call('HSET', key, name, ARGV[2 * i + 1]) end
    redis.call('EXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


# KEYS: from, to (contact clocks). ARGV: ttl_s. Each attribute's time on `to` becomes the
# later of the two, so no value older than one sent to the old contact wins on the new.
_CARRY = """
local from = redis.call('HGETALL', KEYS[1])
if #from == 0 then return 0 end
for i = 1, #from, 2 do
  local kept = tonumber(redis.call('HGET', KEYS[2], from[i]) or '-1')
  if tonumber(from[i + 1]) > kept then redis.call('HSET', KEYS[2], from[i], from[i + 1]) end
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return #from / 2
"""


def contact_key(ids: Ids) -> str:
    """The clock of a contact (within its account)."""
    # Contact ids are unique within an account only; the length prefix keeps
    # ("a:b", "c") and ("a", "b:c") apart.
    size = len(ids.account.encode())
    return keys.attribute_clock(f"c:{size}:{ids.account}:{ids.contact}")


def entity_key(command: SetAttribute) -> str:
    """The clock of the entity a setAttribute command writes to."""
    if command.entity == "account":
        return keys.attribute_clock("a:" + command.account)
    return contact_key(Ids(command.account, command.contact))


def carry(r: Any, changes: list[ContactChange], ttl_s: int) -> None:
    """The attribute clock of each user's old contact carried over to the new one
    (before the batch reserves its writes); a side whose account is unknown has none."""
    pipe = r.pipeline(transaction=False)
    for change in changes:
        if change.before.account and change.after.account:
            pipe.eval(_CARRY, 2, contact_key(change.before), contact_key(change.after), ttl_s)
    pipe.execute()


def stamps(parsed: Parsed) -> dict[str, int]:
    """Each item's event time in epoch milliseconds (items without one are absent)."""
    return {
        item.id: int(event.timestamp.timestamp() * 1000)
        for item, event in parsed
        if event.timestamp is not None
    }


@dataclass(frozen=True)
class Write:
    """One attribute write to check: the event's relay id, the command's place among its
    commands, the entity's clock, the attribute and the event time (ms)."""

    rid: str
    place: int
    key: str
    name: str
    stamp: int


def writes(plan: Plan, stamps: dict[str, int], done: Collection[str] = ()) -> list[Write]:
    """The attribute writes of `plan.send` the clock checks: those of events with an
    event time (`stamps`: relay id -> ms), but not of `done` (relay ids an earlier run
    delivered, left as they are)."""
    out = []
    for item, commands in plan.send:
        stamp = stamps.get(item.id)
        if stamp is None or item.id in done:
            continue
        for m, command in enumerate(commands):
            if isinstance(command, SetAttribute):
                out.append(Write(item.id, m, entity_key(command), command.name, stamp))
    return out


def reserve(r: Any, checked: list[Write], ttl_s: int) -> set[tuple[str, int]]:
    """Move each clock forward to its write's event time, in order, and return the writes
    older than the last one let through (relay id, place): for `relay.plan.without`."""
    if not checked:
        return set()
    args: list[Any] = [ttl_s]
    for write in checked:
        args += [write.name, write.stamp]
    # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.state.oom).
    # EVALSHA: Redis keeps the script, its text is sent again only after a NOSCRIPT.
    script = r.register_script(oom.header(r) + _RESERVE)
    verdicts = script(keys=[w.key for w in checked], args=args)
    return {(w.rid, w.place) for w, ok in zip(checked, verdicts, strict=True) if not int(ok)}


class Peek:
    """What `carry` and `reserve` would do, read-only (a preview, a dry run): the clocks
    they would move are kept here, so later pages of a dry run see them moved."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self.moved: dict[tuple[str, str], int] = {}  # (clock, attribute) -> event ms
        self.carried: dict[str, list[str]] = {}  # new contact's clock -> old contacts'

    def carry(self, changes: list[ContactChange]) -> None:
        """Remember each change's old contact clock as the new one's too."""
        for change in changes:
            if change.before.account and change.after.account:
                to = contact_key(change.after)
                self.carried.setdefault(to, []).append(contact_key(change.before))

    def reserve(self, checked: list[Write]) -> set[tuple[str, int]]:
        """The writes `reserve` would drop now: one round trip, nothing written."""
        if not checked:
            return set()
        pipe = self.r.pipeline(transaction=False)
        asked = []
        for write in checked:
            for key in [write.key, *self.carried.get(write.key, [])]:
                pipe.hget(key, write.name)
                asked.append(write)
        kept: dict[tuple[str, str], int] = {}
        for write, raw in zip(asked, pipe.execute(), strict=True):
            clock = (write.key, write.name)
            if raw is not None:
                kept[clock] = max(kept.get(clock, -1), int(raw))
        stale = set()
        for write in checked:
            clock = (write.key, write.name)
            last = max(kept.get(clock, -1), self.moved.get(clock, -1))
            if write.stamp >= last:
                self.moved[clock] = write.stamp
            else:
                stale.add((write.rid, write.place))
        return stale
