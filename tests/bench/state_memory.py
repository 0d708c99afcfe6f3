"""`python -m tests.bench.state_memory REDIS_URL`: bytes per entry of the identity and
attribute state, measured on a real Redis: give it a Redis of its own (other clients move
used_memory), e.g. `redis-server --port 6391 --save ""`; its database is flushed.

Each kind is written N times through the relay's own functions; bytes per entry is the
`INFO memory` used_memory growth divided by N (it includes Redis's per-key overhead),
the least of three rounds (other databases of a shared Redis move used_memory too), and
`MEMORY USAGE` of one entry is shown beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import redis

from relay import keys
from relay.commands import Command, SetAttribute
from relay.delivery import attribute_clock
from relay.envelope import Envelope
from relay.plan import Plan
from relay.resolution import Known
from relay.state import identity, parking

N = 20_000
TTL_S = 30 * 24 * 3600


def _identity(r: Any, n: int) -> str:
    pipe = r.pipeline(transaction=False)
    known = Known(f"acct-{n:06d}", f"user{n:06d}@example.com", 1_793_577_600_000 + n)
    identity.stage_store(pipe, {f"u:user-{n:08d}-abcdefgh": known}, TTL_S)
    pipe.execute()
    return keys.identity(f"u:user-{n:08d}-abcdefgh")


def _alias(r: Any, n: int) -> str:
    pipe = r.pipeline(transaction=False)
    identity.stage_links(pipe, {f"a:anon-{n:08d}-0123456789ab": f"u:user-{n:08d}"}, TTL_S)
    pipe.execute()
    return keys.alias(f"a:anon-{n:08d}-0123456789ab")


def _clock(attributes: int, entity: str) -> Callable[[Any, int], str]:
    def write(r: Any, n: int) -> str:
        commands = [
            SetAttribute(account=f"acct-{n:06d}", contact=f"u{n:06d}@ex.com", entity=entity,
                         name=f"Attribute {a}", value=1) for a in range(attributes)
        ]  # fmt: skip
        item = Envelope.new({"type": "identify"}, source="api", received_at=0.0, rid="r")
        plan = Plan(send=[(item, list[Command](commands))])
        writes = attribute_clock.writes(plan, {"r": 1_793_577_600_000 + n})
        attribute_clock.reserve(r, writes, TTL_S)
        return attribute_clock.entity_key(commands[0])

    return write


def _tombstone(r: Any, n: int) -> str:
    r.set(keys.deleted(f"u:user-{n:08d}-abcdefgh"), 1_793_577_600.5, ex=TTL_S)
    return keys.deleted(f"u:user-{n:08d}-abcdefgh")


def _parked(traits: int) -> Callable[[Any, int], str]:
    # As an Engage audience sync parks them: snake_case booleans and a computed trait.
    def write(r: Any, n: int) -> str:
        user = f"u:user-{n:08d}-abcdefgh"
        parked = {f"audience_{a}_members": (1_793_577_600_000 + n, True) for a in range(traits)}
        parked["lifetime_value"] = (1_793_577_600_000 + n, 1234.5)
        pipe = r.pipeline(transaction=False)
        parking.stage_park(pipe, user, parked, TTL_S)
        pipe.execute()
        return keys.parked(user)

    return write


KINDS: dict[str, Callable[[Any, int], str]] = {
    "identity entry (userId -> account, email contact)": _identity,
    "alias link (anonymousId -> userId)": _alias,
    "attribute clock, contact with 5 attributes": _clock(5, "contact"),
    "attribute clock, contact with 20 attributes": _clock(20, "contact"),
    "attribute clock, account with 10 attributes": _clock(10, "account"),
    "delete tombstone": _tombstone,
    "parked traits of a user, 5 traits (hash and index entry)": _parked(4),
    "parked traits of a user, 20 traits (hash and index entry)": _parked(19),
}


def measure(r: Any, rounds: int = 3) -> list[tuple[str, float, int]]:
    """(kind, bytes per entry from INFO growth, MEMORY USAGE of one) per kind."""
    out = []
    for name, write in KINDS.items():
        growth = []
        for _ in range(rounds):
            r.flushdb()
            before = int(r.info("memory")["used_memory"])
            last = ""
            for n in range(N):
                last = write(r, n)
            growth.append((int(r.info("memory")["used_memory"]) - before) / N)
        out.append((name, min(growth), int(r.memory_usage(last) or 0)))
    r.flushdb()
    return out


if __name__ == "__main__":
    client = redis.Redis.from_url(sys.argv[1])
    print(f"Redis {client.info('server')['redis_version']}, {N:,} entries per kind")
    print("| state | bytes per entry (INFO) | MEMORY USAGE of one |")
    print("|---|---:|---:|")
    for kind, per_entry, usage in measure(client):
        print(f"| {kind} | {per_entry:.0f} | {usage} |")
