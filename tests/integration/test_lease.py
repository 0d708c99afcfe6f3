"""Workers' leases on a real Redis (relay.state.lease): a lapsed worker's takes and held
messages are put back, a live one's never, an outage of everyone lapses no one, and a
claim of a lapsed worker's run is taken over."""

from __future__ import annotations

import pytest
import redis

from relay import keys, wire
from relay.delivery.claims import Claims, State
from relay.state import lease
from tests.integration.conftest import event_item

pytestmark = pytest.mark.integration

LEASE_S = 8.0


def now_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def a_message(rid: str) -> bytes:
    return wire.MessageWriter().encode([event_item(rid)])


def sweep(r: redis.Redis) -> list[bytes]:
    return lease.sweep(r, LEASE_S, unacked_index="unacked_index", visibility_s=60, limit=100,
                       fallback_queue=keys.QUEUE)  # fmt: skip


def test_a_lapsed_workers_takes_go_back_and_its_held_tags_are_returned(r: redis.Redis) -> None:
    r.zadd(keys.WORKERS, {"dead": now_ms(r) - 1_000, "alive": now_ms(r) + 5_000})
    r.set(keys.WORKERS_BEAT, now_ms(r))
    taken = a_message("t1")
    r.lpush(keys.worker_taken("dead"), taken)
    r.sadd(keys.worker_held("dead"), "tag-1")
    r.lpush(keys.worker_taken("alive"), a_message("t2"))
    r.sadd(keys.worker_held("alive"), "tag-2")
    assert sweep(r) == [b"tag-1"]
    assert r.lrange(keys.QUEUE, 0, -1) == [taken]
    assert r.llen(keys.worker_taken("dead")) == 0 and not r.exists(keys.worker_held("dead"))
    assert r.llen(keys.worker_taken("alive")) == 1 and r.scard(keys.worker_held("alive")) == 1
    # Kept registered as lapsed, so its runs' claims are still taken over.
    assert r.zscore(keys.WORKERS, "dead") is not None


def test_a_take_goes_back_to_its_own_queue(r: redis.Redis) -> None:
    r.zadd(keys.WORKERS, {"dead": now_ms(r) - 1_000})
    replayed = wire.MessageWriter().encode([event_item("r1")], queue=keys.REPLAY_QUEUE)
    r.lpush(keys.worker_taken("dead"), replayed, b"{not json")
    sweep(r)
    assert r.lrange(keys.REPLAY_QUEUE, 0, -1) == [replayed]
    assert r.lrange(keys.QUEUE, 0, -1) == [b"{not json"]


def test_after_a_silence_longer_than_a_lease_no_worker_is_taken_for_dead(r: redis.Redis) -> None:
    # Every worker last beat 30 s ago (Redis was down): their deadlines passed meanwhile.
    last = now_ms(r) - 30_000
    r.set(keys.WORKERS_BEAT, last)
    r.zadd(keys.WORKERS, {"was-alive": last + 6_000, "already-dead": last - 60_000})
    r.lpush(keys.worker_taken("was-alive"), a_message("t3"))
    r.lpush(keys.worker_taken("already-dead"), a_message("t4"))
    sweep(r)
    assert r.llen(keys.worker_taken("was-alive")) == 1  # a fresh lease, not swept
    assert float(r.zscore(keys.WORKERS, "was-alive") or 0) > now_ms(r)
    assert r.llen(keys.worker_taken("already-dead")) == 0


def test_beat_says_whether_the_lease_had_lapsed(r: redis.Redis) -> None:
    assert lease.beat(r, LEASE_S) == 2
    assert lease.beat(r, LEASE_S) == 0
    r.zadd(keys.WORKERS, {lease.worker_id(): now_ms(r) - 1})
    assert lease.beat(r, LEASE_S) == 1


def test_enlist_puts_back_its_own_unrecorded_takes_and_returns_what_it_holds(
    r: redis.Redis,
) -> None:
    taken = a_message("t5")
    r.lpush(lease.taken_key(), taken)
    r.sadd(lease.held_key(), "tag-9")
    assert lease.enlist(r, LEASE_S, keys.QUEUE) == [b"tag-9"]
    assert r.lrange(keys.QUEUE, 0, -1) == [taken]
    assert float(r.zscore(keys.WORKERS, lease.worker_id()) or 0) > now_ms(r)


def test_a_claim_held_by_a_lapsed_worker_is_taken_over_and_by_a_live_one_is_busy(
    r: redis.Redis,
) -> None:
    claims = Claims(r, lease_s=55, ttl_s=3600)
    r.zadd(keys.WORKERS, {"aaaa": now_ms(r) + 5_000, "bbbb": now_ms(r) - 1_000})
    r.set(keys.run_lock("m-live"), "aaaa.token", px=55_000)
    r.set(keys.run_lock("m-dead"), "bbbb.token", px=55_000)
    r.set(keys.run_lock("m-unknown"), "cccc.token", px=55_000)  # a worker with no lease
    assert claims.claim("m-live", 1).state is State.BUSY
    assert claims.claim("m-unknown", 1).state is State.BUSY
    claim = claims.claim("m-dead", 1)
    assert claim.state is State.CLAIMED
    assert r.get(keys.run_lock("m-dead")) == claim.token.encode()
    assert r.hexists(keys.run("m-dead"), "claimed")
