"""The middle layer in-process, on a real Redis and the sandbox: a message that runs
twice is settled once, a delayed batch moved twice or by two movers at once is published
under one id, and the counters move once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from relay import keys, wire
from relay.delivery import delayed
from relay.delivery.batch import Delivery, MessageBusy
from relay.delivery.claims import Claims, State
from relay.delivery.sending import Budget
from relay.envelope import Envelope
from relay.state import broker
from tests.integration.conftest import Sandbox, event_item, queued_items

pytestmark = pytest.mark.integration


def items(n: int, prefix: str = "e") -> list[dict[str, Any]]:
    return [event_item(f"{prefix}{i}") for i in range(n)]


def sent(sandbox: Sandbox) -> list[str]:
    return sorted(c["eventName"] for c in sandbox.commands())


def test_a_message_that_runs_twice_is_settled_once(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    r.set(keys.DEPTH_READY, 5)
    first = delivery.deliver(items(5), "m1")
    again = delivery.deliver(items(5), "m1")
    assert first.delivered == 5 and not first.already_settled
    assert again.already_settled
    assert sent(clean_sandbox) == [f"e{i}" for i in range(5)]
    assert int(r.hget(keys.STATS, "delivered")) == 5
    # The ready count moved once, and nothing is left in flight.
    assert int(r.get(keys.DEPTH_READY)) == 0
    assert int(r.get(keys.DEPTH_INFLIGHT)) == 0


def test_a_rerun_sends_only_what_no_run_delivered(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # A run got its 2xx for e0 and e1, then lost Redis before it could settle.
    claims = Claims(r, lease_s=30, ttl_s=600)
    crashed = claims.claim("m2", 4)
    claims.mark_done(crashed, ["e0", "e1"])
    claims.release(crashed)
    report = delivery.deliver(items(4), "m2")
    assert sent(clean_sandbox) == ["e2", "e3"]
    assert report.delivered == 4  # all four are delivered, two by the earlier run
    assert int(r.get(keys.DEPTH_INFLIGHT)) == 0


def test_a_copy_waits_for_the_run_that_holds_its_message(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    claims = Claims(r, lease_s=30, ttl_s=600)
    holder = claims.claim("m3", 3)
    assert holder.state is State.CLAIMED
    reports: list[Any] = []
    copy = threading.Thread(target=lambda: reports.append(delivery.deliver(items(3), "m3")))
    copy.start()
    copy.join(0.5)
    assert copy.is_alive()  # waiting: the holder still runs
    pipe = r.pipeline(transaction=True)
    claims.stage_settled(pipe, holder, 3)
    pipe.execute()
    copy.join(10)
    assert reports and reports[0].already_settled
    assert clean_sandbox.commands() == []


def test_a_batch_two_movers_hold_is_published_once_and_counted_once(r: redis.Redis) -> None:
    pipe = r.pipeline()
    delayed.stage_schedule(pipe, [Envelope.from_dict(i) for i in items(3)], due=0)
    pipe.execute()
    [member] = r.zrange(keys.DELAYED, 0, -1)
    batch = wire.unpack(member)
    queue = broker.Queue(r, message_events=500)
    # One mover claimed the batch and stalled past its lease (0 s); another moves it.
    assert delayed.Mover(r, queue, lease_s=0).move_due() == 3
    # The first one wakes up and publishes what it claimed: nothing moves.
    index = (keys.delayed_received("delayed"), batch["id"])
    assert not queue.move(member, batch["items"], "d-" + batch["id"], index)
    assert queued_items(r) == batch["items"]
    assert int(r.get(keys.DELAYED_EVENTS)) == 0
    assert int(r.get(keys.DEPTH_READY)) == 3
    # A third mover finds nothing, and the counters do not move.
    assert delayed.Mover(r, queue).move_due() == 0
    assert int(r.get(keys.DEPTH_READY)) == 3
    assert r.zcard(keys.DELAYED) == 0


def test_two_movers_at_once_move_each_due_batch_once(r: redis.Redis) -> None:
    pipe = r.pipeline()
    for n in range(30):
        delayed.stage_schedule(pipe, [Envelope.from_dict(i) for i in items(2, f"b{n}-")], due=0)
    later = [Envelope.from_dict(i) for i in items(1, "later")]
    delayed.stage_schedule(pipe, later, due=time.time() + 3600)
    pipe.execute()
    # Each mover's first publish waits until the other has claimed a page too: both hold
    # claims at once, whatever the machine's speed.
    both_claimed = threading.Barrier(2, timeout=30)
    published: list[str] = []

    class FirstWaits(broker.Queue):
        """The queue, but its first move waits for the other mover's first."""

        first = True

        def move(
            self, member: bytes, items: list[dict[str, Any]], message_id: str,
            received: tuple[str, str],
        ) -> bool:  # fmt: skip
            if self.first:
                self.first = False
                both_claimed.wait()
            moved = super().move(member, items, message_id, received)
            if moved:
                published.append(message_id)
            return moved

    def run_mover() -> int:
        mover, moved = delayed.Mover(r, FirstWaits(r, message_events=500), page=10), 0
        while step := mover.move_due():
            moved += step
        return moved

    with ThreadPoolExecutor(2) as pool:
        movers = [pool.submit(run_mover) for _ in range(2)]
        moved = [m.result(timeout=60) for m in movers]
    assert len(published) == len(set(published)) == 30  # each batch once
    assert sum(moved) == 60 and all(moved)  # both moved, neither moved it all
    assert int(r.get(keys.DEPTH_READY)) == 60
    assert int(r.get(keys.DELAYED_EVENTS)) == 1 and r.zcard(keys.DELAYED) == 1  # not due


def test_a_claim_resent_after_a_lost_reply_finds_its_own_lease(r: redis.Redis) -> None:
    # redis-py resends a command whose reply a broken connection lost: the resent claim
    # must not find the lease it took itself busy (its run would wait for nobody).
    claims = Claims(r, lease_s=30, ttl_s=600)
    r.set(keys.DEPTH_READY, 4)
    first = claims.claim("m4", 4, token="t1")
    again = claims.claim("m4", 4, token="t1")
    assert first.state is again.state is State.CLAIMED
    assert int(r.get(keys.DEPTH_READY)) == 0 and int(r.get(keys.DEPTH_INFLIGHT)) == 4
    assert claims.claim("m4", 4).state is State.BUSY  # any other run waits


def test_only_the_holder_gives_a_lease_back(r: redis.Redis) -> None:
    claims = Claims(r, lease_s=30, ttl_s=600)
    holder = claims.claim("m5", 1)
    late = claims.claim("m5", 1)
    claims.release(late)  # a run that never held the lease frees nothing
    assert claims.claim("m5", 1).state is State.BUSY
    claims.release(holder)
    assert claims.claim("m5", 1).state is State.CLAIMED


def test_a_copy_gives_its_message_back_rather_than_claim_it_too_late_to_send(
    make_delivery: Callable[..., Delivery], r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    found = make_delivery(task_time_limit_s=9, visibility_timeout_s=30)
    budget = Budget.of(found.settings, 0.0)
    # Every request that starts in time ends before the deadline; a copy stops waiting
    # while a run would still have half its sending time.
    assert budget.claim_by < budget.send_by
    timeout_s = found.settings.churnzero_timeout_s
    assert budget.send_by + min(timeout_s, budget.deadline / 2) <= budget.deadline
    holder = Claims(r, lease_s=60, ttl_s=600).claim("m6", 2)
    started = time.monotonic()
    with pytest.raises(MessageBusy):
        found.deliver(items(2), "m6")
    assert time.monotonic() - started >= budget.claim_by - 0.5  # it did wait a while
    assert clean_sandbox.commands() == []
    Claims(r, lease_s=60, ttl_s=600).release(holder)
    assert found.deliver(items(2), "m6").delivered == 2
