"""`python -m tests.bench.dedupe_memory [N]`: Redis memory per dedupe claim, old and new.

Starts its own redis-server (other processes' keys would skew `used_memory`), claims N
messageIds (default 200,000) in batches of 500 as workers do, spread over one 24 h window
(a clock given to Dedupe), and prints used_memory per
event for the previous scheme (a `SET NX EX` string per messageId) and relay/delivery/dedupe.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from relay.delivery.dedupe import Dedupe
from relay.envelope import Envelope
from tests.procs import free_port, start_redis

BATCH = 500
WINDOW_S = 24 * 3600
# The previous version's script: one string key per messageId, value = the relay id.
_OLD = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'NX', 'EX', ARGV[1])
end
return 0
"""


def _items(n: int) -> list[Envelope]:
    # Segment libraries send uuid4 messageIds (analytics.js prefixes "ajs-next-"); relay
    # ids are 16 hex digits and a hex counter, as ingest makes them.
    prefix = uuid.uuid4().hex[:16]
    return [
        Envelope.new(
            {"messageId": f"ajs-next-{uuid.uuid4()}"},
            source="api",
            received_at=0.0,
            rid=f"{prefix}{i:x}",
        )
        for i in range(n)
    ]


def _used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def measure(r: redis.Redis, n: int) -> dict[str, float]:
    """Bytes of used_memory per claimed event, for both schemes."""
    items = _items(n)
    out: dict[str, float] = {}
    r.flushall()
    old = r.register_script(_OLD)
    before = _used(r)
    for start in range(0, n, BATCH):
        batch = items[start : start + BATCH]
        old(
            keys=[f"relay:dedupe:{i.message_id}" for i in batch],
            args=[WINDOW_S, *(i.id for i in batch)],
        )
    out["old_bytes_per_event"] = (_used(r) - before) / n
    r.flushall()
    # The claims are spread over one window, as at a steady rate: every bucket is there
    # at the end, and each claim looks in all the buckets before it.
    t0 = time.time()
    clock = [t0]
    dedupe = Dedupe(r, WINDOW_S, clock=lambda: clock[0])
    before = _used(r)
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        clock[0] = t0 + WINDOW_S * start / n
        dedupe.duplicates(items[start : start + BATCH])
    out["new_claims_per_s"] = n / (time.perf_counter() - started)
    out["new_bytes_per_event"] = (_used(r) - before) / n
    encodings: dict[str, int] = {}
    for key in r.scan_iter("relay:seen:*:*", count=1000):
        encoding = r.object("encoding", key)
        encodings[str(encoding)] = encodings.get(str(encoding), 0) + 1
    out["new_shards"] = sum(encodings.values())
    out["new_shards_not_listpack"] = sum(v for k, v in encodings.items() if "listpack" not in k)
    return out


def main() -> None:
    """Print the figures of one run."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(port, Path(tmp))
        try:
            r = redis.Redis(port=port)
            print(f"redis {r.info('server')['redis_version']}, {n:,} claims")
            for name, value in measure(r, n).items():
                print(f"{name}: {value:,.1f}")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
