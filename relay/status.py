"""The status report operators read: depths, rates over the last minute, oldest age,
dead letters by reason. Shared by `relay status`, `/admin/api/status` and the admin page."""

from __future__ import annotations

import time
from typing import Any

import orjson

from relay import keys, names, queue_state

WINDOW_S = 60
PROBLEM_TTL_S = 600  # a problem not seen again for this long is taken as fixed


def record_churnzero_problem(r: Any, problem: str, now: float | None = None) -> None:
    """Remember a ChurnZero configuration problem for status (sync Redis client)."""
    when = time.time() if now is None else now
    r.set(keys.CHURNZERO_PROBLEM, orjson.dumps({"problem": problem, "at": when}),
          ex=PROBLEM_TTL_S)  # fmt: skip


def churnzero_problem(r: Any) -> dict[str, Any] | None:
    """The last ChurnZero configuration problem, while it is recent."""
    raw = r.get(keys.CHURNZERO_PROBLEM)
    return orjson.loads(raw) if raw else None


RATE_TTL_S = 3 * WINDOW_S


def rate_key(name: str, now: float) -> str:
    """The key counting events of `name` in the second of `now`."""
    return f"{keys.RATE}{name}:{int(now)}"


def stage_rate(pipe: Any, name: str, count: int, now: float) -> None:
    """Queue on a pipeline: count `count` events of `name` in this second's bucket."""
    key = rate_key(name, now)
    pipe.incrby(key, count)
    pipe.expire(key, RATE_TTL_S)


# Upper bounds (s) of the ChurnZero request-duration histogram that workers keep in Redis.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def stage_request_seconds(pipe: Any, durations: list[float]) -> None:
    """Queue on a pipeline: add request durations to the deployment-wide histogram."""
    if not durations:
        return
    per_bucket: dict[str, int] = {}
    for seconds in durations:
        bound = next((b for b in REQUEST_BUCKETS if seconds <= b), "+Inf")
        per_bucket[str(bound)] = per_bucket.get(str(bound), 0) + 1
    for bound, n in per_bucket.items():
        pipe.hincrby(keys.STATS, f"request_seconds_bucket:{bound}", n)
    pipe.hincrby(keys.STATS, "request_seconds_count", len(durations))
    pipe.hincrby(keys.STATS, "request_seconds_sum_us", int(sum(durations) * 1_000_000))


def request_histogram(stats: dict[str, int]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) buckets and the sum (s) of the histogram in `stats`."""
    running = 0
    buckets = []
    for bound in [*map(str, REQUEST_BUCKETS), "+Inf"]:
        running += stats.get(f"request_seconds_bucket:{bound}", 0)
        buckets.append((bound, running))
    return buckets, stats.get("request_seconds_sum_us", 0) / 1_000_000


def rates(r: Any, now: float | None = None) -> dict[str, Any]:
    """Per-second counts of the last minute for ingested and delivered events."""
    now = time.time() if now is None else now
    # The current second is still filling up; the minute ends with the last full one.
    seconds = [int(now) - WINDOW_S + i for i in range(WINDOW_S)]
    out: dict[str, Any] = {}
    for name in ("ingested", "delivered"):
        values = r.mget([f"{keys.RATE}{name}:{s}" for s in seconds])
        series = [int(v or 0) for v in values]
        out[name] = {"per_s": round(sum(series) / WINDOW_S, 2), "series": series}
    return out


def report(r: Any) -> dict[str, Any]:
    """Everything `relay status --json` prints."""
    now = time.time()
    snap = queue_state.snapshot(r, now)
    return {
        "time": now,
        "depth": snap.depth,
        "messages": snap.messages,
        "oldest_age_s": round(snap.oldest_age_s, 3),
        "paused_for_s": round(snap.paused_for_s, 3),
        "redis_memory_fraction": round(snap.memory_fraction, 4),
        "dead_letters": snap.dead_by_reason,
        "rates": rates(r, now),
        "counters": snap.stats,
        "churnzero_problem": churnzero_problem(r),
        "names": names.report(r),
        "replay": replay_progress(r, snap.stats),
        "learned_rate_rps": learned_rate(r),
    }


def replay_progress(r: Any, stats: dict[str, int]) -> dict[str, int]:
    """The replay lane: messages waiting in it, events replayed and delivered so far."""
    return {
        "queued_messages": int(r.llen(keys.REPLAY_QUEUE)),
        "replayed": stats.get("replayed", 0),
        "delivered": stats.get("replay_delivered", 0),
    }


def learned_rate(r: Any) -> float | None:
    """The self-tuning rate (requests/s) the workers learned, None before any 429."""
    value = r.hget(keys.ADAPTIVE_RATE, "rate")
    return round(float(value), 2) if value else None
