"""The ingest gate's memory rule: refuse above the threshold of maxmemory, never when
maxmemory is unlimited, and count what was queued since the last reading."""

from __future__ import annotations

from relay.ingest.gate import REDIS_BYTES_PER_BODY_BYTE, QueueGate
from relay.state.status import memory_fraction

MB = 1024 * 1024


def read(gate: QueueGate, used: int, maxmemory: int) -> QueueGate:
    """What a refresh records from INFO memory (the I/O is the integration tests')."""
    gate.used_memory, gate.maxmemory = used, maxmemory
    return gate


def test_unlimited_maxmemory_leaves_only_the_queue_depth() -> None:
    gate = read(QueueGate(limit=10, max_memory_fraction=0.9), used=50 * MB, maxmemory=0)
    gate.queued(100 * MB)
    assert gate.memory_fraction == 0.0 and gate.open
    assert memory_fraction({"used_memory": 5, "maxmemory": 0}) == 0.0


def test_closes_at_the_threshold_with_the_reason() -> None:
    gate = read(QueueGate(limit=10, max_memory_fraction=0.9), used=89 * MB, maxmemory=100 * MB)
    assert gate.open
    read(gate, used=90 * MB, maxmemory=100 * MB)
    assert not gate.open


def test_bytes_queued_since_the_last_reading_count_before_the_next_one() -> None:
    gate = read(QueueGate(limit=10, max_memory_fraction=0.9), used=80 * MB, maxmemory=100 * MB)
    gate.queued(4 * MB)  # estimated at REDIS_BYTES_PER_BODY_BYTE times its size
    assert gate.memory_fraction == (80 + 4 * REDIS_BYTES_PER_BODY_BYTE) / 100
    gate.queued(1 * MB)
    assert not gate.open
    assert "maxmemory" in gate.reason
