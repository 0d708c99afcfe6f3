"""`ratelimit`: a backlog delivered through the relay's global rate limit to a sandbox
that refuses (429) whatever exceeds the same limit.

The backlog is queued first, then one worker is started; over the steady window (the
first 2 s of delivery skipped) the requests the sandbox answered 200 per second should
be the limit, and almost none should be refused.
"""

from __future__ import annotations

from typing import Any

from tests import procs
from tests.bench import harness
from tests.bench.harness import Env, say
from tests.bench.load import SandboxView, blast
from tests.bench.payloads import batch_body, track

LIMIT_RPS = 50
COMMANDS_PER_REQUEST = 5
EVENTS = 6_000
BATCH = 100
SKIP_S = 2.0


def _window(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of the steady window: from 2 s after the first request to the last 200."""
    if not requests:
        raise RuntimeError("the sandbox received no request")
    first = requests[0]["t"]
    last_ok = max((r["t"] for r in requests if r["status"] == 200), default=first)
    start, end = first + SKIP_S, last_ok
    steady = [r for r in requests if start <= r["t"] <= end]
    ok = sum(1 for r in steady if r["status"] == 200)
    throttled = sum(1 for r in steady if r["status"] == 429)
    seconds = end - start
    # Requests answered 200 in each second from the first request: the shape of the run.
    per_second = [0] * (int(last_ok - first) + 1)
    for r in requests:
        if r["status"] == 200:
            per_second[int(r["t"] - first)] += 1
    return {
        "window_s": round(seconds, 3),
        "requests": len(steady),
        "answered_200": ok,
        "answered_429": throttled,
        "achieved_rps": ok / seconds if seconds > 0 else 0.0,
        "throttled_fraction": throttled / len(steady) if steady else 0.0,
        "all_requests": len(requests),
        "all_429": sum(1 for r in requests if r["status"] == 429),
        "delivery_s": round(last_ok - first, 3),
        "ok_per_second": per_second,
    }


def queue_backlog(env: Env, children: Any, limit_rps: float, events: int) -> SandboxView:
    """A sandbox allowing `limit_rps` requests/s, and a backlog of `events` tracks
    queued for it through a real ingest process."""
    sandbox = SandboxView(procs.start_sandbox(children).url)
    sandbox.faults(rate_limit_rps=limit_rps)
    ingest = harness.start_ingest(children, env.redis_url).url
    say(f"  backlog: {events:,} tracks ({events // COMMANDS_PER_REQUEST:,} requests)")
    bodies = [
        batch_body([track(i, ids=True) for i in range(start, start + BATCH)])
        for start in range(0, events, BATCH)
    ]
    sent = blast(ingest + "/v1/batch", bodies, 8)
    if sent.non_2xx or sent.errors:
        raise RuntimeError(f"the backlog was not queued whole: {sent.as_dict()}")
    return sandbox


def ratelimit(env: Env) -> dict[str, Any]:
    """Achieved request rate against the limit, and the share of requests refused."""
    with harness.bench_context(env, "ratelimit") as children:
        sandbox = queue_backlog(env, children, LIMIT_RPS, EVENTS)
        say(f"  worker: {LIMIT_RPS} requests/s, {COMMANDS_PER_REQUEST} commands per request")
        worker = harness.start_relay_worker(
            children,
            env.redis_url,
            sandbox.url,
            rate_limit_rps=LIMIT_RPS,
            churnzero_batch_size=COMMANDS_PER_REQUEST,
        )
        expected_s = EVENTS / COMMANDS_PER_REQUEST / LIMIT_RPS
        got = sandbox.wait_commands(
            EVENTS, timeout=expected_s * 2 + 30, stall=15, alive=worker.check_alive
        )
        window = _window(sandbox.requests_log())
        stats = env.relay_stats()
    ratio = window["achieved_rps"] / LIMIT_RPS
    return {
        "name": "ratelimit",
        "events_per_s": round(window["achieved_rps"] * COMMANDS_PER_REQUEST, 1),
        "baseline_per_s": None,
        "ratio": round(ratio, 3),
        "p99_ms": None,
        "achieved_rps": round(window["achieved_rps"], 2),
        "limit_rps": LIMIT_RPS,
        "throttled_fraction": round(window["throttled_fraction"], 4),
        "events": EVENTS,
        "delivered": got,
        "window": window,
        "relay_stats": stats,
        "target": "achieved/limit >= 0.95 and throttled_fraction < 0.01",
        "met": ratio >= 0.95 and window["throttled_fraction"] < 0.01 and got >= EVENTS,
    }
