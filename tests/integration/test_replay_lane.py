"""Replays in their own lane: while live events flow, a replay gets its share of the rate
and no more; once they stop, it gets all of it. Status shows its progress."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from relay.reasons import Reason
from relay.state import deadletter
from tests.integration.conftest import WRITE_KEY, Sandbox, Starter, relay_cli, settled, wait_for

pytestmark = pytest.mark.integration
RATE = 20
SHARE = 0.2
DEAD = 200
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def seed_dead_letters(r: redis.Redis, n: int) -> None:
    stamp = "2024-05-01T10:00:00Z"
    deadletter.add(r, [
        deadletter.new_entry(
            {"id": f"rid-{i}", "source": "api", "received_at": time.time(), "attempts": 1,
             "event": {"type": "track", "userId": "u", "event": f"Replayed {i}",
                       "timestamp": stamp, "properties": IDS}},
            Reason.RETRIES_EXHAUSTED,
        )
        for i in range(n)
    ])  # fmt: skip


def live_traffic(url: str, stop: threading.Event, sent: list[str]) -> None:
    """Live events at a steady 8/s (the load's own pace, not a wait on the system)."""
    while not stop.is_set():
        name = f"Live {len(sent)}"
        event = {"type": "track", "userId": "u", "event": name, "properties": IDS}
        requests.post(url + "/v1/track", auth=(WRITE_KEY, ""), json=event).raise_for_status()
        sent.append(name)
        stop.wait(0.125)


def timeline(sandbox: Sandbox) -> list[tuple[float, str]]:
    """(time, event name) of each command ChurnZero accepted, one command per request."""
    commands = sandbox.commands()  # first: the log read after it holds at least as many
    accepted = [req for req in sandbox.requests_log() if req["status"] == 200]
    return [(req["t"], c["eventName"]) for req, c in zip(accepted, commands, strict=False)]


def test_a_replay_takes_its_share_while_live_events_flow(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    seed_dead_letters(r, DEAD)
    url = start_ingest()
    start_worker(rate_limit_rps=RATE, replay_share=SHARE, churnzero_batch_size=1)
    stop, sent = threading.Event(), list[str]()
    live = threading.Thread(target=live_traffic, args=(url, stop, sent))
    live.start()
    try:
        wait_for(lambda: len(sent) >= 5)  # live events are flowing
        assert relay_cli(r, "dlq", "replay", "--all").returncode == 0
        # While live events flow, for at least 5 s of replay traffic.
        wait_for(lambda: sum(n.startswith("Replayed") for _, n in timeline(clean_sandbox)) >= 25)
    finally:
        stop.set()
        live.join()
    stopped = time.time()
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == DEAD + len(sent), 60)

    events = timeline(clean_sandbox)
    replays = [t for t, name in events if name.startswith("Replayed")]
    during = [t for t in replays if t < stopped - 2.5]  # the live flag lasts 2 s
    assert len(during) >= 10
    seconds = during[-1] - during[0]
    # The replay's share (4/s) while live flows, plus a slot of slack.
    assert (len(during) - 1) / seconds <= RATE * SHARE * 1.25
    # Every live event arrived, and all of them while the replay was going on.
    live_names = {name for _, name in events if name.startswith("Live")}
    assert live_names == set(sent)
    # Afterwards the replay has the whole rate to itself: it goes faster than its share.
    after = [t for t in replays if t > stopped + 2.5]
    assert len(after) >= DEAD // 2
    assert (len(after) - 1) / (after[-1] - after[0]) > RATE * SHARE * 2

    report = json.loads(relay_cli(r, "status", "--json").stdout)
    assert report["replay"] == {"queued_messages": 0, "replayed": DEAD, "delivered": DEAD}


def test_without_a_rate_a_replay_waits_for_live_events(r: redis.Redis) -> None:
    from relay.delivery.throttle import Throttle

    throttle = Throttle(r, rate_limit_rps=0, outage_threshold=3, adaptive=False)
    assert throttle.reserve(3, 0.5, "replay") == [0.0, 0.0, 0.0]  # alone: no limit
    assert throttle.reserve(2, 5.0, "live") == [0.0, 0.0]
    wait: Any = throttle.reserve(3, 0.5, "replay")  # live work flowed in the last 2 s
    assert wait == 1.0


def test_a_replay_reserves_a_second_ahead_beside_live_work_and_little_alone(
    r: redis.Redis,
) -> None:
    from relay.delivery.throttle import REPLAY_ALONE_MAX_WAIT_S, REPLAY_MAX_WAIT_S, Throttle

    throttle = Throttle(r, rate_limit_rps=100, outage_threshold=3, replay_share=0.2,
                        adaptive=False)  # fmt: skip
    # Alone, the whole rate (10 ms apart), but no further ahead than its alone horizon:
    # live work arriving gets its part of the rate that soon.
    alone: Any = throttle.reserve(500, REPLAY_MAX_WAIT_S, "replay")
    assert alone == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]
    assert REPLAY_ALONE_MAX_WAIT_S == 0.05
    assert throttle.reserve(1, 5.0, "live") == [0.0]  # live work flows from now on
    # Beside it, the replay's share (20/s, 50 ms apart), reserved up to a second ahead:
    # the task waits for its slots rather than putting its events back.
    shared: Any = throttle.reserve(500, REPLAY_MAX_WAIT_S, "replay")
    assert 15 <= len(shared) <= 21
    assert max(shared) <= REPLAY_MAX_WAIT_S
    gaps = [b - a for a, b in itertools.pairwise(shared)]
    assert all(0.048 <= gap <= 0.052 for gap in gaps)
