"""A full Redis (maxmemory, noeviction): ingest refuses with 503 before Redis fills up,
workers start and lose nothing even when it is full, and every acknowledged event is
delivered once there is room. Each test runs its own small redis-server."""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests
from kombu.exceptions import OperationalError

from relay import wire
from tests.integration.conftest import (
    WRITE_KEY,
    OwnRedis,
    Sandbox,
    Starter,
    settled,
    url_of,
    wait_for,
)

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


def pad() -> str:
    # Fills Redis faster; not a ChurnZero field, so never sent. Random, so that the
    # messages' compression leaves it about its size (1,500 characters).
    return base64.b64encode(os.urandom(1125)).decode()


@pytest.fixture
def small_redis(own_redis: OwnRedis) -> redis.Redis:
    """A redis-server of 20 MB that refuses writes when full, as docker-compose's does
    (small: what fills it is delivered afterwards, and that takes most of a test's time)."""
    return own_redis("--maxmemory", "20mb", "--maxmemory-policy", "noeviction")[1]


def track(message_id: str) -> dict[str, Any]:
    return {
        "type": "track", "userId": "u1", "event": "E", "messageId": message_id,
        "timestamp": "2026-11-01T10:00:00Z",
        "properties": {"accountExternalId": "A", "contactExternalId": "C",
                       "description": message_id, "pad": pad()},
    }  # fmt: skip


def oom_refusals(r: redis.Redis) -> int:
    """How many commands Redis has refused for want of memory."""
    stat = r.info("errorstats").get("errorstat_OOM", {})
    return int(stat.get("count", 0)) if isinstance(stat, dict) else 0


def delivered(sandbox: Sandbox) -> list[str]:
    return [c["description"] for c in sandbox.commands() if c["action"] == "trackEvent"]


def sandbox_count(sandbox: Sandbox) -> int:
    return int(requests.get(sandbox.url + "/_sandbox/stats", timeout=5).json()["commands"])


def test_ingest_answers_503_before_redis_is_full_and_a_worker_drains_every_event(
    small_redis: redis.Redis,
    clean_sandbox: Sandbox,
    start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:
    r = small_redis
    url = start_ingest(redis_url=url_of(r))
    acknowledged: list[str] = []
    refused = 0
    ready = None
    for n in range(3000):  # about 100 batches fill 90 % of 20 MB
        batch = [track(f"m-{n}-{i}") for i in range(100)]
        answer = requests.post(url + "/v1/batch", auth=AUTH, json={"batch": batch}, timeout=10)
        if answer.status_code == 200:
            acknowledged += [e["messageId"] for e in batch]
            continue
        # Refused before Redis is full, as Segment's libraries expect: 503 and Retry-After.
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] and "memory" in answer.json()["error"]
        refused += 1
        ready = requests.get(url + "/readyz", timeout=5)
        if ready.status_code == 503:  # a fresh reading agrees: Redis is at the threshold
            break
    assert ready is not None and ready.status_code == 503, "ingest never refused"
    assert "maxmemory" in ready.json()["reason"]
    assert ready.json()["memory_fraction"] >= 0.9
    # Ingest stopped in time: Redis never refused a write, nor was it full.
    memory = r.info("memory")
    assert memory["used_memory"] < memory["maxmemory"]
    assert oom_refusals(r) == 0
    assert len(acknowledged) > 5_000  # most of what 90 % of 20 MB holds (about 10,000)

    start_worker(redis_url=url_of(r))
    wait_for(lambda: sandbox_count(clean_sandbox) >= len(acknowledged) and settled(r), 120)
    assert sorted(delivered(clean_sandbox)) == sorted(acknowledged)  # each exactly once
    assert r.zcard("relay:dlq:index") == 0
    wait_for(lambda: requests.get(url + "/readyz", timeout=5).status_code == 200)
    assert oom_refusals(r) == 0


def fill_until_full(r: redis.Redis) -> list[str]:
    """Publish straight into the queue (no admission check) until Redis refuses; the queued ids."""
    from relay.settings import Settings
    from relay.state import broker

    celery = broker.make_celery(Settings(), url_of(r))
    queued: list[str] = []
    for n in range(2000):
        items = [
            {"id": f"rid-{n}-{i}", "source": "api", "received_at": time.time(), "attempts": 0,
             "event": track(f"f-{n}-{i}")}
            for i in range(500)
        ]  # fmt: skip
        try:
            broker.send(celery, items, retry_policy={"max_retries": 0})
        except OperationalError:
            return queued
        queued += [i["event"]["messageId"] for i in items]
    raise AssertionError("Redis never filled up")


# Queue and unacked read in one step (a message moves between them at any time); the
# no-writes flag lets it run at maxmemory, where Redis refuses even a MULTI of reads.
_SNAPSHOT = """#!lua flags=no-writes
return {redis.call('LRANGE', KEYS[1], 0, -1), redis.call('HVALS', KEYS[2]),
        redis.call('ZRANGE', KEYS[3], 0, -1), redis.call('HVALS', KEYS[4])}
"""


def accounted(r: redis.Redis, sandbox: Sandbox) -> set[str]:
    """Every messageId still queued, held unacked by a worker, waiting for a retry,
    dead-lettered, or delivered."""
    queue, unacked, delayed, dead = r.eval(
        _SNAPSHOT, 4, "relay", "unacked", "relay:delayed", "relay:dlq:entries"
    )
    messages = [json.loads(raw) for raw in queue] + [json.loads(raw)[0] for raw in unacked]
    items = [item for m in messages for item in _args(m)]
    items += [item for raw in delayed for item in wire.unpack(raw)["items"]]
    items += [json.loads(raw)["item"] for raw in dead]
    found = {item["event"]["messageId"] for item in items}
    return found | set(delivered(sandbox))  # read after Redis: delivery precedes the ack


def held_since(r: redis.Redis) -> list[float]:
    """When each message still unacked was taken by a worker."""
    return [t for _, t in r.zrange("unacked_index", 0, -1, withscores=True)]


def _args(message: dict[str, Any]) -> list[dict[str, Any]]:
    return wire.items_of(message)


def test_workers_on_a_full_redis_lose_nothing_and_drain_it_once_there_is_room(
    small_redis: redis.Redis,
    clean_sandbox: Sandbox,
    start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:
    r = small_redis
    queued = fill_until_full(r)
    url = start_ingest(redis_url=url_of(r))
    answer = requests.post(url + "/v1/batch", auth=AUTH, json={"batch": [track("late")]})
    assert answer.status_code == 503 and "memory" in answer.json()["error"]

    # Stock kombu stopped here ("Unrecoverable error"), after popping a message it could
    # not record as unacked: that message was lost.
    refused_before = oom_refusals(r)
    settings = {"visibility_timeout_s": 21, "task_time_limit_s": 6}
    first = start_worker(redis_url=url_of(r), **settings)
    # It works on (taking messages while Redis refuses its writes), or drains it outright
    # if all its own writes are let through at maxmemory (relay.state.oom).
    wait_for(
        lambda: (
            (r.hlen("unacked") > 0 and oom_refusals(r) > refused_before + 20)
            or (settled(r) and sandbox_count(clean_sandbox) >= len(queued))
        ),
        60,
    )
    assert first.popen.poll() is None, first.tail()
    # Nothing lost (a message is in no snapshot for the instant between BRPOP and its
    # unacked record, hence the wait).
    wait_for(lambda: accounted(r, clean_sandbox) >= set(queued), 10)

    # The operator adds memory; a worker started afterwards delivers every event.
    r.config_set("maxmemory", "0")
    first.stop()
    wait_for(lambda: accounted(r, clean_sandbox) >= set(queued), 10)
    # Messages the first worker still held come back once their visibility timeout ends.
    wait_for(lambda: all(time.time() - t > 22 for t in held_since(r)), 60)
    start_worker(redis_url=url_of(r), **settings)
    wait_for(lambda: sandbox_count(clean_sandbox) >= len(queued) and settled(r), 120)
    # Every event, at least once: a batch sent to ChurnZero whose bookkeeping Redis then
    # refused is sent again on retry (at least once, as after a worker crash).
    assert set(delivered(clean_sandbox)) == set(queued)


def test_staged_writes_refused_at_maxmemory_run_through_relay_oom(
    small_redis: redis.Redis,
) -> None:
    from relay.state import oom

    r = small_redis
    r.config_set("maxmemory", str(r.info("memory")["used_memory"]))  # full from now on

    def staged() -> Any:
        return r.pipeline().incrby("depth", 5).hset("entries", "id", "x").zadd("index", {"id": 1})

    with pytest.raises(redis.ResponseError, match=r"maxmemory|discarded"):
        staged().execute()
    assert r.dbsize() == 0
    oom.execute(r, staged())
    assert (r.get("depth"), r.hget("entries", "id"), r.zscore("index", "id")) == (b"5", b"x", 1)


def test_staged_scripts_run_inside_relay_oom_at_maxmemory(small_redis: redis.Redis) -> None:
    # A settlement stages scripts (new names, identity merges) beside plain commands: all
    # of them run as one script, in order, which Redis accepts when full.
    from relay.state import oom

    r = small_redis
    counting = r.register_script(  # a registered script (EVALSHA), with its flags line
        oom.ALLOW_OOM + "redis.call('INCRBY', KEYS[1], ARGV[1])\nreturn 1"
    )
    appending = "for _, v in ipairs(ARGV) do redis.call('RPUSH', KEYS[1], v) end\nreturn #ARGV"
    r.config_set("maxmemory", str(r.info("memory")["used_memory"]))  # full from now on

    def staged() -> Any:
        pipe = r.pipeline()
        pipe.set("n", 1)
        counting(keys=["n"], args=[5], client=pipe)
        pipe.eval(appending, 1, "list", "a", "b")
        counting(keys=["n"], args=[10], client=pipe)
        pipe.eval(appending, 1, "list", "c")
        pipe.hset("h", "f", "v")
        return pipe

    with pytest.raises(redis.ResponseError, match=r"maxmemory|discarded"):
        staged().execute()
    assert r.dbsize() == 0
    oom.execute(r, staged())
    assert r.get("n") == b"16"
    assert r.lrange("list", 0, -1) == [b"a", b"b", b"c"]
    assert r.hget("h", "f") == b"v"


def test_relay_oom_runs_a_command_longer_than_lua_unpacks(small_redis: redis.Redis) -> None:
    # A settlement of thousands of dead letters is one HSET of thousands of fields.
    from relay.state import oom

    r = small_redis
    fields = {f"f{n}": n for n in range(oom.MAX_UNPACK)}
    oom.execute(r, r.pipeline().hset("h", mapping=fields).incr("n"))
    assert (r.hlen("h"), r.get("n")) == (oom.MAX_UNPACK, b"1")


def fill_with_backlog(r: redis.Redis) -> list[str]:
    """Queue events as ingest does (compressed messages of 500) until Redis refuses the
    next message; the queued messageIds. Their properties compress about as real ones
    do, unlike `pad`'s random bytes."""
    from relay.state import broker

    queue = broker.Queue(r, 500)
    words = random.Random(7)
    queued: list[str] = []
    for n in range(400):
        items = []
        for i in range(500):
            event = track(f"b-{n}-{i}")
            event["properties"]["pad"] = " ".join(f"word{words.randrange(64)}" for _ in range(8))
            items.append({"id": f"rid-{n}-{i}", "source": "api", "received_at": time.time(),
                          "attempts": 0, "event": event})  # fmt: skip
        try:
            queue.publish(items)
        except redis.OutOfMemoryError:
            return queued
        queued += [i["event"]["messageId"] for i in items]
    raise AssertionError("Redis never filled up")


class MemoryWatch(threading.Thread):
    """The most memory Redis used while it ran (read every few milliseconds)."""

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url_of(r))
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            time.sleep(0.005)

    def stop(self) -> int:
        self.done.set()
        self.join(10)
        self.client.close()
        return self.peak


def rejected_writes(r: redis.Redis) -> Counter[str]:
    """Commands Redis refused so far, by name (at maxmemory: for want of memory)."""
    stats = r.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): int(v.get("rejected_calls", 0))
                    for k, v in stats.items() if v.get("rejected_calls")})  # fmt: skip


def test_a_backlog_that_filled_redis_drains_to_empty_through_a_churnzero_outage(
    own_redis: OwnRedis, clean_sandbox: Sandbox, start_worker: Starter
) -> None:
    _, r = own_redis("--maxmemory", "6mb", "--maxmemory-policy", "noeviction")
    maxmemory = int(r.info("memory")["maxmemory"])
    # ChurnZero is down while the backlog builds: the worker defers every message it takes
    # to the delayed set (after the first failures, without sending), and back. The record
    # of settled events is kept small: its cost is fixed by its size,
    # more than this Redis holds at the default (docs/sizing.md), whatever the backlog.
    clean_sandbox.fault(status=503)
    start_worker(redis_url=url_of(r), trace_size=1000)
    watch = MemoryWatch(r)
    watch.start()
    queued = fill_with_backlog(r)
    refused_by_fill = rejected_writes(r)
    # Most of the backlog has been deferred before ChurnZero is back.
    wait_for(lambda: int(r.get("relay:depth:delayed") or 0) >= len(queued) // 2, 120)
    clean_sandbox.clear_faults()
    wait_for(lambda: sandbox_count(clean_sandbox) >= len(queued) and settled(r), 180)
    peak = watch.stop()
    print(f"\nbacklog {len(queued)} events; peak used_memory {peak / maxmemory:.2f} x maxmemory")
    assert sorted(delivered(clean_sandbox)) == sorted(queued)  # each exactly once
    assert r.zcard("relay:dlq:index") == 0
    # Every write the worker's delivery makes was accepted at maxmemory. Two commands may
    # be refused, changing nothing: kombu's sweep of unacked messages takes a mutex with a
    # plain SET (the sweep is put off), and a take's BLMOVE (the take script, flagged
    # allow-oom, takes over for a while; relay.state.transport).
    refused_by_worker = rejected_writes(r) - refused_by_fill
    harmless = Counter(set=refused_by_worker["set"], blmove=refused_by_worker["blmove"])
    assert not refused_by_worker - harmless, refused_by_worker
    # Deferring a message to the delayed set, and back, does not grow Redis: it goes past
    # maxmemory by the bookkeeping of the backlog's events only (their dedupe claims,
    # some 20 bytes each, a quarter of what such a backlog's messages take).
    assert peak < 1.5 * maxmemory, peak / maxmemory


def test_relay_oom_logs_its_plain_multi_once_and_counts_each(small_redis: redis.Redis) -> None:
    # A command too long to inline (more arguments than Lua unpacks) makes the pipeline a
    # plain MULTI, which Redis refuses at maxmemory: the operator must be able to see it.
    from structlog.testing import capture_logs

    from relay.state import oom

    r = small_redis
    fields = {f"f{n}": n for n in range(oom.MAX_UNPACK // 2 + 1)}
    with capture_logs() as logs:
        for _ in range(2):
            oom.execute(r, r.pipeline().hset("h", mapping=fields))
    assert r.hlen("h") == len(fields)
    assert int(r.hget("relay:stats", "oom_fallbacks")) == 2
    lines = [e for e in logs if e["event"] == "oom_plain_transaction"]
    assert len(lines) <= 1  # once per process: another test may have logged it already
    assert all(e["command"] == "HSET" for e in lines)
