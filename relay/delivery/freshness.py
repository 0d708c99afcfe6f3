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


def reserve(
    r: Any, plan: Plan, stamps: dict[str, int], ttl_s: int, done: Collection[str] = ()
) -> int:
    """Drop from `plan.send` every attribute write older than the last one let through
    for its (entity, attribute); an event left with nothing to send is skipped as
    `stale_attribute`. `stamps`: relay id -> event time (ms); `done`: relay ids an
    earlier run delivered (left as they are). Returns the writes dropped."""
    writes: list[tuple[int, int]] = []  # (index in plan.send, index in its commands)
    names: list[str] = []
    args: list[Any] = [ttl_s]
    for n, (item, commands) in enumerate(plan.send):
        stamp = stamps.get(item.id)
        if stamp is None or item.id in done:
            continue
        for m, command in enumerate(commands):
            if isinstance(command, SetAttribute):
                writes.append((n, m))
                names.append(entity_key(command))
                args += [command.name, stamp]
    if not writes:
        return 0
    # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.state.oom).
    # EVALSHA: Redis keeps the script, its text is sent again only after a NOSCRIPT.
    verdicts = r.register_script(oom.header(r) + _RESERVE)(keys=names, args=args)
    stale = {w for w, ok in zip(writes, verdicts, strict=True) if not int(ok)}
    if not stale:
        return 0
    send = []
    for n, (item, commands) in enumerate(plan.send):
        kept = [c for m, c in enumerate(commands) if (n, m) not in stale]
        if kept:
            send.append((item, kept))
        else:
            plan.skipped.append((item, "stale_attribute"))
    plan.send = send
    return len(stale)
