"""Dedupe claims on a real Redis: same-copy/other-copy semantics, the window, and memory
that stays compact (listpack shards) and bounded (buckets expire) at any event rate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay.dedupe import Dedupe, relay_tag
from relay.envelope import Envelope
from tests.bench.dedupe_memory import measure
from tests.conftest import free_port, start_redis

DAY = 24 * 3600


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


def test_a_zero_window_turns_dedupe_off(r: redis.Redis) -> None:
    dedupe = Dedupe(r, 0)
    dedupe.duplicates(items(5, "a"))
    assert dedupe.duplicates(items(5, "b")) == set()
    assert r.dbsize() == 0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A redis-server of the test's own: used_memory is the whole server's."""
    port = free_port()
    proc = start_redis(port, tmp_path / "redis")
    client = redis.Redis(port=port)
    yield client
    client.close()
    proc.terminate()
    proc.wait(10)


def test_memory_per_event_is_a_tenth_of_a_key_per_message_id(own_redis: redis.Redis) -> None:
    figures = measure(own_redis, 50_000)
    assert figures["old_bytes_per_event"] > 150
    assert figures["new_bytes_per_event"] < 25, figures
    assert figures["new_shards_not_listpack"] == 0
