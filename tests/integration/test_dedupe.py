"""Dedupe claims on a real Redis: same-copy/other-copy semantics, the window, and memory
that stays compact (listpack shards) and bounded (buckets expire) at any event rate."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from relay.delivery.dedupe import Dedupe, relay_tag
from relay.envelope import Envelope
from tests.bench.dedupe_memory import measure
from tests.integration.conftest import OwnRedis

DAY = 24 * 3600
BUCKET = DAY // 24  # claims are kept in buckets of 1/24 of the window


def item(rid: str, event: dict[str, Any]) -> Envelope:
    return Envelope.new(event, source="api", received_at=0.0, rid=rid)


def items(n: int, copy: str, start: int = 0) -> list[Envelope]:
    """n items with messageIds m<start>…; `copy` names the relay ids (one copy each)."""
    return [item(f"{copy}-{i}", {"messageId": f"m{i}"}) for i in range(start, n)]


def tag_clash(i: int) -> bool:
    return relay_tag(f"a-{i}") == relay_tag(f"b-{i}")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_other_copies_are_duplicates_and_the_same_copy_passes(r: redis.Redis) -> None:
    dedupe = Dedupe(r, DAY)
    assert dedupe.duplicates(items(300, "a")) == set()
    # The same copies again (worker crash, retry, replay): never their own duplicates.
    assert dedupe.duplicates(items(300, "a")) == set()
    # Other copies (Segment resending), including two copies in one batch.
    assert dedupe.duplicates(items(300, "b")) == {f"b-{i}" for i in range(300)}
    batch = [item("c-1", {"messageId": "new"}), item("c-2", {"messageId": "new"})]
    assert dedupe.duplicates(batch) == {"c-2"}
    # Items without a messageId are never duplicates.
    assert dedupe.duplicates([item("d", {"type": "track"})]) == set()


def test_a_released_claim_lets_a_later_copy_through(r: redis.Redis) -> None:
    dedupe = Dedupe(r, DAY)
    dedupe.duplicates(items(10, "a"))
    dedupe.release(items(5, "b"))  # not the claimer: changes nothing
    dedupe.release(items(5, "a"))
    assert dedupe.duplicates(items(10, "b")) == {f"b-{i}" for i in range(5, 10)}


def test_claims_survive_shard_splits_and_shards_stay_listpacks(r: redis.Redis) -> None:
    # 20,000 claims into one bucket: about 160 shards, grown one split at a time.
    dedupe = Dedupe(r, DAY)
    for start in range(0, 20_000, 500):
        assert dedupe.duplicates(items(start + 500, "a", start)) == set()
    for start in range(0, 20_000, 500):
        got = dedupe.duplicates(items(start + 500, "b", start))
        # A copy whose relay-id tag equals the claimer's passes as the claimer (1 in 2**24).
        same_tag = {f"b-{i}" for i in range(start, start + 500) if tag_clash(i)}
        assert got == {f"b-{i}" for i in range(start, start + 500)} - same_tag
    shards = list(r.scan_iter("relay:seen:*:*", count=1000))
    assert len(shards) > 100
    assert {r.object("encoding", k) for k in shards} == {b"listpack"}
    assert max(r.hlen(k) for k in shards) < 512


def test_the_window_ends_and_buckets_expire_with_it(r: redis.Redis) -> None:
    clock = Clock()
    dedupe = Dedupe(r, DAY, clock=clock)
    dedupe.duplicates(items(50, "a"))
    ttls = [r.ttl(k) for k in r.scan_iter("relay:seen:*")]
    # A bucket is an hour (1/24 of the window) and lives until it leaves the window.
    assert ttls and all(DAY < t <= DAY + 3600 + 1 for t in ttls)
    clock.now += DAY - 60
    assert len(dedupe.duplicates(items(50, "b"))) == 50
    clock.now += 3600 + 120  # past the window and the bucket's hour
    assert dedupe.duplicates(items(50, "c")) == set()


def copy(rid: str, message_id: str) -> list[Envelope]:
    return [item(rid, {"messageId": message_id})]


@pytest.mark.parametrize("into_bucket_s", [0, BUCKET - 1])
def test_a_claim_lasts_the_window_wherever_it_falls_in_its_bucket(
    r: redis.Redis, into_bucket_s: int
) -> None:
    clock = Clock()
    clock.now = (clock.now // BUCKET + 1) * BUCKET + into_bucket_s
    claimed_at = clock.now
    dedupe = Dedupe(r, DAY, clock=clock)
    assert dedupe.duplicates(copy("a", "m")) == set()
    clock.now = claimed_at + DAY - 1  # the last second of its window
    assert dedupe.peek(copy("b", "m")) == {"b"}
    # Gone at most a bucket after its window: claims expire a bucket at a time.
    clock.now = claimed_at + DAY + BUCKET + 1
    assert dedupe.duplicates(copy("b", "m")) == set()


def test_a_claim_is_found_and_released_from_a_later_bucket(r: redis.Redis) -> None:
    clock = Clock()
    dedupe = Dedupe(r, DAY, clock=clock)
    dedupe.duplicates(copy("a", "m"))
    clock.now += 2 * BUCKET + 1  # two buckets on: a worker retrying after a long outage
    dedupe.duplicates(copy("x", "n"))  # claims go to a newer bucket now
    assert dedupe.peek(copy("b", "m")) == {"b"}  # another copy is still a duplicate
    assert dedupe.duplicates(copy("a", "m")) == set()  # the claimer still passes
    dedupe.release(copy("a", "m"))  # it ended in the dead-letter queue
    assert dedupe.peek(copy("b", "m")) == set()  # a peek claims nothing ...
    assert dedupe.duplicates(copy("b", "m")) == set()  # ... so a later resend goes through
    assert dedupe.duplicates(copy("c", "m")) == {"c"}


@pytest.mark.parametrize("skew_s", [2, BUCKET - 60])
def test_workers_whose_clocks_differ_by_less_than_a_bucket_see_each_others_claims(
    r: redis.Redis, skew_s: int
) -> None:
    # Two hosts, one's clock ahead: around an hour's turn, it claims into a bucket the
    # other's clock has not reached yet.
    ahead, behind = Clock(), Clock()
    ahead.now = (ahead.now // BUCKET + 1) * BUCKET + 1
    behind.now = ahead.now - skew_s
    assert Dedupe(r, DAY, clock=ahead).duplicates(copy("a", "m")) == set()
    assert Dedupe(r, DAY, clock=behind).duplicates(copy("b", "m")) == {"b"}
    assert Dedupe(r, DAY, clock=behind).duplicates(copy("a", "m")) == set()  # its own
    # And the other way round: the claim of the one behind is found by the one ahead.
    assert Dedupe(r, DAY, clock=behind).duplicates(copy("c", "n")) == set()
    assert Dedupe(r, DAY, clock=ahead).duplicates(copy("d", "n")) == {"d"}


def test_a_zero_window_turns_dedupe_off(r: redis.Redis) -> None:
    dedupe = Dedupe(r, 0)
    dedupe.duplicates(items(5, "a"))
    assert dedupe.duplicates(items(5, "b")) == set()
    assert r.dbsize() == 0


def test_memory_per_event_is_a_tenth_of_a_key_per_message_id(own_redis: OwnRedis) -> None:
    _, server = own_redis()  # a redis-server of its own: used_memory is the whole server's
    figures = measure(server, 50_000)
    assert figures["old_bytes_per_event"] > 150
    assert figures["new_bytes_per_event"] < 25, figures
    assert figures["new_shards_not_listpack"] == 0


def test_a_batch_is_claimed_a_shard_at_a_time(r: redis.Redis) -> None:
    """Redis's work grows with the shards a batch touches, not with its events."""
    dedupe = Dedupe(r, DAY)
    r.config_resetstat()
    assert dedupe.duplicates(items(300, "a")) == set()
    assert dedupe.duplicates(items(300, "b")) == {f"b-{i}" for i in range(300)}
    stats = r.info("commandstats")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.split("_", 1)[1] != "config")
    assert calls < 100, stats  # a read and a write per event would be 1,200
