"""The delayed set: events waiting for their next try (retry backoff, pauses, identity
waits), kept in Redis rather than as Celery ETA tasks. A member is one group of them (their
items, cause and an id) as JSON, compressed as queued messages are (relay.wire.pack): a
settlement that defers a whole message stores less than the message it frees.

A Celery ETA past the visibility timeout is delivered twice, and ETA tasks sit in worker
memory. Here a ZSET holds them by due time; a mover in every worker moves due members
back to the queue. Moving is claim, then publish-and-remove: a claim pushes the member's
due time forward by a lease (on Redis's clock, so hosts' clocks do not matter), so a
mover that dies in between loses nothing: the member comes due again after the lease. The
publish removes the member and moves its count from delayed to ready in the same script
call (`broker.Queue.move`), so of two movers holding the same member only one publishes it.

Beside the set, an index per state (`waiting_state`: `delayed`, or `identity_wait` for
tracks waiting for their user) holds each member's oldest receipt time by member id, so
status reads the age of the oldest event waiting here without reading the set; the
schedule adds to it and the move takes out in the same steps as the set's.
"""

from __future__ import annotations

import uuid
from typing import Any

from relay import keys, wire
from relay.envelope import Envelope
from relay.reasons import Deferral
from relay.state import broker, lua, oom

LEASE_S = 60
WAITING_STATES = ("delayed", Deferral.IDENTITY_WAIT.value)

# A mover's claim on the due members of the delayed set. Its KEYS and ARGV:
# relay/state/lua/delayed_claim.lua.
_CLAIM = lua.read("delayed_claim")


def stage_schedule(pipe: Any, items: list[Envelope], due: float, cause: str = "") -> bytes | None:
    """Queue on a pipeline: these envelopes come back to the queue at `due` (unix time);
    `cause` (why they wait) is kept for `relay trace`. Returns the set member (None:
    nothing to schedule)."""
    if not items:
        return None
    stored = [item.to_dict() for item in items]
    member_id = uuid.uuid4().hex
    member = wire.pack({"id": member_id, "items": stored, "cause": cause})
    pipe.zadd(keys.DELAYED, {member: due})
    pipe.incrby(keys.DELAYED_EVENTS, len(items))
    received = [item.received_at for item in items if item.received_at is not None]
    if received:
        pipe.zadd(keys.delayed_received(waiting_state(cause)), {member_id: min(received)})
    return member


def waiting_state(cause: str | None) -> str:
    """The state a delayed member's events are in for status: `identity_wait` for tracks
    waiting for their user, `delayed` for the rest."""
    return Deferral.IDENTITY_WAIT.value if cause == Deferral.IDENTITY_WAIT else "delayed"


class Mover:
    """Moves due members from the delayed set back to the Celery queue."""

    def __init__(
        self, r: Any, queue: broker.Queue, page: int = 200, lease_s: float = LEASE_S
    ) -> None:
        self._queue = queue
        self._page = page
        self._lease_s = lease_s
        # Allowed at maxmemory (Redis 7+): moving work back frees as much as it writes.
        self._claim = r.register_script(oom.header(r) + _CLAIM)
        # After a call that found nothing due: the seconds until the next member is (None:
        # none waits).
        self.next_due_in_s: float | None = None

    def move_due(self) -> int:
        """Move what is due; returns the number of events moved."""
        indexes = [keys.delayed_received(state) for state in WAITING_STATES]
        members, next_in = self._claim(
            keys=[keys.DELAYED, *indexes], args=[self._page, self._lease_s]
        )
        self.next_due_in_s = None if float(next_in) < 0 else float(next_in)
        moved = 0
        for member in members:
            unpacked = wire.unpack(member)
            items = unpacked["items"]  # moved as stored, undecoded
            index = keys.delayed_received(waiting_state(unpacked.get("cause")))
            member_id = str(unpacked["id"])
            if self._queue.move(member, items, "d-" + member_id, (index, member_id)):
                moved += len(items)
        return moved
