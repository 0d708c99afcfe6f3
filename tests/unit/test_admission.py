"""Ingest's admission memory rule: refuse above the threshold of maxmemory, never when
maxmemory is unlimited, and count what was queued since the last reading."""

from __future__ import annotations

from relay.ingest.admission import REDIS_BYTES_PER_BODY_BYTE, Admission
from relay.state.status import memory_fraction

MB = 1024 * 1024


def read(admission: Admission, used: int, maxmemory: int) -> Admission:
    """What a refresh records from INFO memory (the I/O is the integration tests')."""
    admission.used_memory, admission.maxmemory = used, maxmemory
    return admission


def test_unlimited_maxmemory_leaves_only_the_queue_depth() -> None:
    admission = read(Admission(limit=10, max_memory_fraction=0.9), used=50 * MB, maxmemory=0)
    admission.queued(100 * MB)
    assert admission.memory_fraction == 0.0 and admission.open
    assert memory_fraction({"used_memory": 5, "maxmemory": 0}) == 0.0


def test_closes_at_the_threshold_with_the_reason() -> None:
    admission = read(Admission(limit=10, max_memory_fraction=0.9), used=89 * MB, maxmemory=100 * MB)
    assert admission.open
    read(admission, used=90 * MB, maxmemory=100 * MB)
    assert not admission.open


def test_bytes_queued_since_the_last_reading_count_before_the_next_one() -> None:
    admission = read(Admission(limit=10, max_memory_fraction=0.9), used=80 * MB, maxmemory=100 * MB)
    admission.queued(4 * MB)  # estimated at REDIS_BYTES_PER_BODY_BYTE times its size
    assert admission.memory_fraction == (80 + 4 * REDIS_BYTES_PER_BODY_BYTE) / 100
    admission.queued(1 * MB)
    assert not admission.open
    assert "maxmemory" in admission.reason
