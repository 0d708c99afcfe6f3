"""Each of the throttle's mechanisms keeps its own invariant, on a real Redis: the pause
(relay.delivery.pause), the two-lane rate (relay.delivery.rate) and the learned rate
(relay.delivery.learned)."""

from __future__ import annotations

import itertools

import pytest
import redis

from relay import keys
from relay.delivery.learned import ADAPT_MIN_RPS, LearnedRate
from relay.delivery.pause import Pause
from relay.delivery.rate import LaneRate
from relay.state import oom


def test_nobody_sends_during_a_pause_and_one_worker_at_a_time_probes(r: redis.Redis) -> None:
    one, other = (Pause(r, oom.header(r), outage_threshold=2) for _ in range(2))
    assert one.report(successes=0, failures=0, retry_after_s=5) > 4
    assert not one.permit().go and not other.permit().go
    r.delete(keys.PAUSE_UNTIL)
    one.report(successes=0, failures=2, retry_after_s=None)  # an outage: paused again
    assert not other.permit().go
    r.delete(keys.PAUSE_UNTIL)  # the outage pause is over
    first, second = one.permit(), other.permit()
    assert first.go and first.probe  # one probe on the wire ...
    assert not second.go  # ... and nobody else sends meanwhile
    one.report(successes=1, failures=0, retry_after_s=None)  # it went through
    assert other.permit() == one.permit() and other.permit().go and not other.permit().probe


def test_slots_are_one_over_the_rate_apart_and_replays_get_their_share(
    r: redis.Redis,
) -> None:
    lanes = LaneRate(r, oom.header(r), rate_limit_rps=10, replay_share=0.5, adaptive=False)
    live = lanes.reserve(5, 5.0, "live")
    assert isinstance(live, list)
    assert [b - a for a, b in itertools.pairwise(live)] == pytest.approx([0.1] * 4, abs=0.002)
    replay = lanes.reserve(3, 5.0, "replay")  # live work flows: half of the rate
    assert isinstance(replay, list)
    assert [b - a for a, b in itertools.pairwise(replay)] == pytest.approx([0.2] * 2, abs=0.002)


def redis_now_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_the_learned_rate_is_cut_once_per_signal_and_never_below_its_floor(
    r: redis.Redis,
) -> None:
    learned = LearnedRate(r, oom.header(r), cap_rps=0)
    r.hset(keys.ADAPTIVE_RATE, mapping={"rate": 40, "phase": "avoid", "cut_at": 0})
    learned.report(successes=0, throttled=1)
    cut = float(r.hget(keys.ADAPTIVE_RATE, "rate") or 0)
    assert cut < 40
    # Requests on the wire together are one signal: a 429 right after a cut cuts nothing.
    r.hset(keys.ADAPTIVE_RATE, "cut_at", redis_now_ms(r))
    learned.report(successes=0, throttled=1)
    assert float(r.hget(keys.ADAPTIVE_RATE, "rate") or 0) == cut
    r.hset(keys.ADAPTIVE_RATE, mapping={"rate": ADAPT_MIN_RPS, "cut_at": 0})
    learned.report(successes=0, throttled=1)
    assert float(r.hget(keys.ADAPTIVE_RATE, "rate") or 0) == ADAPT_MIN_RPS
