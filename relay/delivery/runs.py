"""A record per Celery message, so that running a message twice settles it once.

A message can run more than once: kombu hands a dead worker's messages out again, a
broker connection blip makes kombu restore every unacked message while its tasks still
run, a Redis error makes a task give its message back, and a publish whose reply a
broken connection lost is sent again. So each run first claims its message:

    settled   the message was settled before: ack it, do nothing
    busy      another run of it holds the lease: wait for that run to end, or give the
              message back
    claimed   this run owns it, and learns which events an earlier run already got a
              2xx for (those are not sent again)

A claim's lease lasts the task's time limit and more; a run of a worker whose own
lease lapsed (it died: relay.state.lease) is taken over at once.

A run marks events done right after ChurnZero's 2xx, and writes its settlement
(dead letters, delayed retries, counters) in one MULTI with the `settled` mark, fenced by
its token: a run frozen past its lease (a paused VM, a starved CPU) while a copy claimed
the message writes no settlement. Done marks are not fenced: a 2xx is a fact whichever
run got it, and it keeps any run from sending those events again. The
first claim of a message also moves its events from the ready count to in-flight, so
re-runs do not make the counters drift.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from relay import keys
from relay.state import lease, oom

# KEYS: run, lock, ready, inflight, workers. ARGV: token, lease_ms, events, ttl_ms.
# Returns {0} settled, {1, pttl} busy, {2, field...} claimed (with the run's fields).
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], 'settled') == 1 then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- Our own lease: this is the same claim again (a client retrying after a lost reply).
  local holder = redis.call('GET', KEYS[2])
  if holder ~= ARGV[1] then
    -- Held by a run of another worker whose own lease lapsed (relay.state.lease): that
    -- run is gone, take over now rather than after the claim's TTL.
    local worker = holder and string.match(holder, '^(%x+)%.')
    local deadline = worker and worker ~= string.match(ARGV[1], '^(%x+)%.')
      and redis.call('ZSCORE', KEYS[5], worker)
    local t = redis.call('TIME')
    if not deadline or tonumber(deadline) >= tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 then
      return {1, redis.call('PTTL', KEYS[2])}
    end
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  end
end
-- 'claimed' holds a value longer than Redis keeps in a listpack (hash-max-listpack-value,
-- 64 bytes by default), so the record is a hash table from the start: each of the
-- hundreds of done marks a run writes is then one lookup, not a scan of those before it.
if redis.call('HSETNX', KEYS[1], 'claimed', '1' .. string.rep(' ', 64)) == 1 then
  -- Once per message. A publisher may count its message just after a worker took it,
  -- so the count can dip below zero for a moment; readers show at least zero.
  redis.call('DECRBY', KEYS[3], ARGV[3])
  redis.call('INCRBY', KEYS[4], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local out = redis.call('HKEYS', KEYS[1])
table.insert(out, 1, 2)
return out
"""

# KEYS: lock. ARGV: token. Only the run that holds the lease gives it back.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: run, lock. ARGV: token. Staged first in a settlement: if another run settled the
# message, or holds its lease now (this run's ran out while it was frozen), the error
# ends the settlement's script before it writes anything.
_FENCE = """
if redis.call('HEXISTS', KEYS[1], 'settled') == 1 then error('relay-fenced: settled') end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then error('relay-fenced: leased') end
return 0
"""

_DONE = "d:"


class Fenced(Exception):
    """Another run settled this message, or holds its lease: this run's settlement was
    not written (`settled`: which of the two)."""

    def __init__(self, settled: bool) -> None:
        super().__init__("settled by another run" if settled else "leased by another run")
        self.settled = settled


class State(Enum):
    """What a claim found."""

    SETTLED = 0
    BUSY = 1
    CLAIMED = 2


@dataclass
class Claim:
    """One run's claim on its message."""

    message_id: str
    state: State
    token: str = ""
    busy_for_s: float = 0.0
    done: set[str] = field(default_factory=set)  # relay ids already delivered by a run
    settle_tried: bool = False  # a settlement MULTI was sent (its answer may be lost)


class Runs:
    """Claims, done marks and settlement marks of messages (sync Redis client)."""

    def __init__(self, r: Any, *, lease_s: float, ttl_s: int) -> None:
        self._redis = r
        self._lease_ms = int(lease_s * 1000)
        self._ttl_ms = ttl_s * 1000
        # Allowed at maxmemory (Redis 7+): a worker must drain a full Redis (relay.state.oom).
        self._claim = r.register_script(oom.header(r) + _CLAIM)
        self._release = r.register_script(oom.header(r) + _RELEASE)
        self._fence = r.register_script(oom.header(r) + _FENCE)

    def claim(self, message_id: str, events: int, token: str | None = None) -> Claim:
        """Claim a message for this run; see the module docstring.

        A claim is re-entrant for its token: redis-py resends a command whose reply a
        broken connection lost, and the resent claim must not find its own lease busy.
        """
        # The worker's id first: a run of a lapsed worker is taken over (relay.state.lease).
        token = token or f"{lease.worker_id()}.{uuid.uuid4().hex}"
        result = self._claim(
            keys=[keys.run(message_id), keys.run_lock(message_id),
                  keys.DEPTH_READY, keys.DEPTH_INFLIGHT, keys.WORKERS],
            args=[token, self._lease_ms, events, self._ttl_ms],
        )  # fmt: skip
        state = State(int(result[0]))
        if state is State.BUSY:
            return Claim(message_id, state, busy_for_s=max(int(result[1]), 0) / 1000)
        if state is State.SETTLED:
            return Claim(message_id, state)
        fields = (f.decode() if isinstance(f, bytes) else str(f) for f in result[1:])
        done = {f.removeprefix(_DONE) for f in fields if f.startswith(_DONE)}
        return Claim(message_id, state, token=token, done=done)

    def mark_done(self, claim: Claim, relay_ids: list[str]) -> None:
        """Remember that these events got their 2xx, before anything else can fail."""
        if not relay_ids:
            return
        run = keys.run(claim.message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(run, mapping={_DONE + rid: 1 for rid in relay_ids})
        pipe.pexpire(run, self._ttl_ms)
        oom.execute(self._redis, pipe)
        claim.done.update(relay_ids)

    def stage_fence(self, pipe: Any, claim: Claim) -> None:
        """Queue first on a settlement: the run's token fences it, so a run that lost its
        lease (frozen past it) writes nothing; see `fenced`."""
        self._fence(
            keys=[keys.run(claim.message_id), keys.run_lock(claim.message_id)],
            args=[claim.token],
            client=pipe,
        )

    @staticmethod
    def fenced(exc: Exception) -> Fenced | None:
        """The fence a settlement's error says it met, if that is what it was."""
        text = str(exc)
        if "relay-fenced" not in text:
            return None
        return Fenced(settled="relay-fenced: settled" in text)

    def stage_settled(self, pipe: Any, claim: Claim, events: int) -> None:
        """Queue on the settlement's MULTI: the message is settled, its lease ends."""
        run = keys.run(claim.message_id)
        pipe.delete(run)
        pipe.hset(run, "settled", 1)
        pipe.pexpire(run, self._ttl_ms)
        pipe.delete(keys.run_lock(claim.message_id))
        pipe.decrby(keys.DEPTH_INFLIGHT, events)

    def is_settled(self, claim: Claim) -> bool:
        """Whether the message's settlement was written."""
        return bool(self._redis.hexists(keys.run(claim.message_id), "settled"))

    def release(self, claim: Claim) -> None:
        """Give the lease back unsettled (the message will run again), if still ours."""
        self._release(keys=[keys.run_lock(claim.message_id)], args=[claim.token])
