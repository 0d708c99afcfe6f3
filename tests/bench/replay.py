"""`replay`: live traffic at a fixed rate, alone, then beside a replay of 200,000 dead
letters in the replay lane, then alone again. Live delivery latency p99 with the replay,
over p99 without.

The relay runs with an explicit rate limit (100 requests/s of 100 commands); live events
use a tenth of it, the replay gets its 20 % share while they flow. Live latency beside
the replay is measured once `relay dlq replay --all` has queued it, while it drains:
every live track carries its send time in `properties.description`, and the sandbox's
request log says when each command arrived. Then what is left of the replay is taken off
its queue, and once the lane has stopped delivering, live latency is measured alone
again. "Alone" is the p99 of both alone windows' events together: on a shared machine
whose load drifts from minute to minute, windows on both sides of the replay's keep
that drift out of the ratio.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tests import procs
from tests.bench import harness
from tests.bench.e2e import _percentile
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView, paced
from tests.bench.payloads import batch_body, track

DEAD = 200_000
RATE_RPS = 100
LIVE_EVENTS_PER_S = 1_000
BATCH = 100
LIVE_SECONDS = 20
LATENCY_MS = 20


def _seed(env: Env) -> None:
    """200,000 dead letters (tracks with their ids), written straight into the DLQ."""
    from relay.reasons import Reason
    from relay.state import deadletter

    r = env.redis()
    try:
        now = time.time()
        for start in range(0, DEAD, 5_000):
            entries = []
            for i in range(start, start + 5_000):
                event = track(i % 1_000, ids=True)
                event.pop("context")
                item = {"id": f"dead-{i}", "source": "api", "received_at": now, "attempts": 3,
                        "event": event}  # fmt: skip
                entries.append(deadletter.new_entry(item, Reason.RETRIES_EXHAUSTED, now=now))
            deadletter.add(r, entries)
    finally:
        r.close()


def _summary(delays: list[float]) -> dict[str, Any]:
    return {
        "delivered": len(delays),
        "p50_ms": round(_percentile(delays, 50), 1),
        "p99_ms": round(_percentile(delays, 99), 1),
        "max_ms": round(max(delays), 1),
    }


def _wait_lane_still(env: Env, still_s: float = 3.0, timeout: float = 60) -> None:
    """Wait until the replay lane has delivered nothing for `still_s` (its queue emptied,
    the messages it held settled)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_count = env.relay_stats().get("replay_delivered", 0)
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= still_s:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the replay lane still delivered after {timeout} s")


def _live(ingest: str, sandbox: SandboxView, worker: procs.Proc) -> list[float]:
    """Paced live tracks; the latency of each (ms), from its send to its arrival."""
    sandbox.clear()
    counter = iter(range(10**9))

    def body() -> bytes:
        sent_at = f"{time.time():.6f}"
        return batch_body([track(next(counter) % 1_000, ids=True, description=sent_at)
                           for _ in range(BATCH)])  # fmt: skip

    sent = paced(ingest + "/v1/batch", body, LIVE_EVENTS_PER_S / BATCH, LIVE_SECONDS)
    expected = sent.requests * BATCH
    deadline = time.monotonic() + 120
    delays: list[float] = []
    while time.monotonic() < deadline:
        worker.check_alive()
        commands = sandbox.commands()  # first: the log read after it holds at least as many
        accepted = [r for r in sandbox.requests_log() if r["status"] == 200]
        arrivals = [r["t"] for r in accepted for _ in range(r["commands"])]
        delays = [
            (t - float(c["description"])) * 1000
            for t, c in zip(arrivals, commands, strict=False)
            if c.get("description")
        ]
        if len(delays) >= expected:
            break
        time.sleep(0.5)
    if len(delays) < expected:
        raise RuntimeError(f"only {len(delays)} of {expected} live events arrived")
    return delays


def replay(env: Env) -> dict[str, Any]:
    """Live p99 beside a 200k-event replay, over live p99 alone."""
    with harness.bench_context(env, "replay") as children:
        sandbox = SandboxView(procs.start_sandbox(children).url)
        sandbox.faults(latency_ms=LATENCY_MS)
        ingest = harness.start_ingest(children, env.redis_url).url
        worker = harness.start_relay_worker(
            children, env.redis_url, sandbox.url, rate_limit_rps=RATE_RPS
        )
        say(f"  live alone: {LIVE_EVENTS_PER_S:,} events/s for {LIVE_SECONDS} s")
        _live(ingest, sandbox, worker)  # warm-up: connections, the learned state
        before = _live(ingest, sandbox, worker)
        say(f"  seeding {DEAD:,} dead letters")
        _seed(env)
        say("  replaying them (relay dlq replay --all) while live events flow")
        replaying = children.start(
            "replay-cli",
            [sys.executable, "-m", "relay.ops.cli", "dlq", "replay", "--all"],
            harness.relay_env(env.redis_url, rate_limit_rps=RATE_RPS),
        )
        published = time.monotonic()
        # Measured once the CLI has queued the replay: its publishing is a one-off burst on
        # the operator's machine (here the same two cores); the lane then drains for minutes.
        if replaying.popen.wait(timeout=300) != 0:
            raise RuntimeError(f"the replay failed:\n{replaying.tail()}")
        publish_s = time.monotonic() - published
        r = env.redis()
        try:
            replayed_before = int(r.hget("relay:stats", "replay_delivered") or 0)
            started = time.monotonic()
            beside = _summary(_live(ingest, sandbox, worker))
            replayed = int(r.hget("relay:stats", "replay_delivered") or 0) - replayed_before
            seconds = time.monotonic() - started
            queued = int(r.llen("relay.replay"))
            say("  the rest of the replay taken off its queue; live alone again")
            r.delete("relay.replay")
            _wait_lane_still(env)
            after = _live(ingest, sandbox, worker)
        finally:
            r.close()
        stats = env.relay_stats()
    alone = _summary(before + after)
    ratio = beside["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else 0.0
    return {
        "name": "replay",
        "events_per_s": LIVE_EVENTS_PER_S,
        "baseline_per_s": None,
        "ratio": round(ratio, 3),
        "live_p99_ratio": round(ratio, 3),
        "p99_ms": beside["p99_ms"],
        "live_alone": alone,
        "live_alone_before": _summary(before),
        "live_alone_after": _summary(after),
        "live_beside_replay": beside,
        "dead_letters": DEAD,
        "replay_delivered_meanwhile": replayed,
        "replay_events_per_s_meanwhile": round(replayed / seconds, 1),
        "replay_messages_still_queued": queued,
        "replay_publish_s": round(publish_s, 1),
        "rate_limit_rps": RATE_RPS,
        "relay_stats": stats,
        "target": "live_p99_ratio <= 1.10 with the replay running",
        "met": ratio <= 1.10 and replayed > 0,
    }
