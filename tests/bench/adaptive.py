"""`adaptive`: the sandbox enforces a rate limit the relay is not told (50 requests/s).

A backlog is queued, one worker started with no RELAY_RATE_LIMIT_RPS: it must learn the
limit from the 429s (slow start, then AIMD). Figures: the first second, counted from the
first request and looking from just after the first 429's cut, at which the 5-second
average of accepted requests is 90 % of the limit or more; the accepted
rate over the steady window (from 10 s after the first request to the last accepted
one) over the limit, and the share of all requests answered 429, slow start included.
"""

from __future__ import annotations

from typing import Any

from tests.bench import harness
from tests.bench.harness import Env, say
from tests.bench.ratelimit import queue_backlog

HIDDEN_RPS = 50
COMMANDS_PER_REQUEST = 5
EVENTS = 20_000
SKIP_S = 10.0


def _figures(requests: list[dict[str, Any]]) -> dict[str, Any]:
    if not requests:
        raise RuntimeError("the sandbox received no request")
    first = requests[0]["t"]
    last_ok = max((r["t"] for r in requests if r["status"] == 200), default=first)
    per_second = [0] * (int(last_ok - first) + 1)
    for r in requests:
        if r["status"] == 200:
            per_second[int(r["t"] - first)] += 1
    # Slow start overshoots (the sandbox's bucket lets a burst through) before the first
    # 429: count from the first cut, when the learned rate has to climb back.
    first_429 = min((r["t"] for r in requests if r["status"] == 429), default=first)
    reached = next(
        (s for s in range(int(first_429 - first) + 3, len(per_second) - 5)
         if sum(per_second[s : s + 5]) / 5 >= 0.9 * HIDDEN_RPS),
        None,
    )  # fmt: skip
    start = first + SKIP_S
    steady = [r for r in requests if start <= r["t"] <= last_ok]
    ok = sum(1 for r in steady if r["status"] == 200)
    seconds = last_ok - start
    throttled = sum(1 for r in requests if r["status"] == 429)
    return {
        "reached_90pct_at_s": reached,
        "first_429_at_s": round(first_429 - first, 1),
        "steady_window_s": round(seconds, 3),
        "achieved_rps": ok / seconds if seconds > 0 else 0.0,
        "requests": len(requests),
        "answered_429": throttled,
        "throttled_fraction": throttled / len(requests),
        "steady_throttled_fraction": (
            sum(1 for r in steady if r["status"] == 429) / len(steady) if steady else 0.0
        ),
        "ok_per_second": per_second,
    }


def adaptive(env: Env) -> dict[str, Any]:
    """Achieved rate against a limit the relay must learn, and the share refused."""
    with harness.bench_context(env, "adaptive") as children:
        sandbox = queue_backlog(env, children, HIDDEN_RPS, EVENTS)
        say(f"  worker: no rate given; the sandbox allows {HIDDEN_RPS} requests/s")
        worker = harness.start_relay_worker(
            children, env.redis_url, sandbox.url, churnzero_batch_size=COMMANDS_PER_REQUEST
        )
        expected_s = EVENTS / COMMANDS_PER_REQUEST / HIDDEN_RPS
        got = sandbox.wait_commands(
            EVENTS, timeout=expected_s * 2 + 60, stall=20, alive=worker.check_alive
        )
        figures = _figures(sandbox.requests_log())
        r = env.redis()
        try:
            learned = r.hget("relay:throttle:adaptive", "rate")
        finally:
            r.close()
        stats = env.relay_stats()
    ratio = figures["achieved_rps"] / HIDDEN_RPS
    reached = figures["reached_90pct_at_s"]
    return {
        "name": "adaptive",
        "events_per_s": round(figures["achieved_rps"] * COMMANDS_PER_REQUEST, 1),
        "baseline_per_s": None,
        "ratio": round(ratio, 3),
        "p99_ms": None,
        "achieved_rps": round(figures["achieved_rps"], 2),
        "limit_rps": HIDDEN_RPS,
        "learned_rps_at_end": float(learned) if learned else None,
        "throttled_fraction": round(figures["throttled_fraction"], 4),
        "events": EVENTS,
        "delivered": got,
        "figures": figures,
        "relay_stats": stats,
        "target": "90 % of the limit within 60 s, ratio >= 0.9, throttled_fraction < 0.02",
        "met": (
            reached is not None
            and reached <= 60
            and ratio >= 0.9
            and figures["throttled_fraction"] < 0.02
            and got >= EVENTS
        ),
    }
