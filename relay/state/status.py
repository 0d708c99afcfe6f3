"""The deployment's status, read from Redis: what is where, how fast, what happened.

Many workers on many hosts and every ingest process write them, so they live in Redis:
event counts by state beside Celery's queue (relay.state.broker keeps the ready count), per-second
rates, the counters of `keys.STATS` (their fields are `keys.Stat`) and the ChurnZero
request histogram. This module computes every figure shown from them: the queue's
`snapshot`, the `report` that `relay status` and the admin API and page show, the counters
and histogram `/metrics` shows (relay.ingest.metrics only formats them), and the `backlog` that
ingest's high-water mark limits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from relay import keys
from relay.reasons import Reason
from relay.state import archive, names, oldest, parking, recent

WINDOW_S = 60
# The per-second counts are kept an hour: the admin page's chart history is read from them.
HISTORY_S = 3600
HISTORY_STEP_S = 10
RATE_TTL_S = HISTORY_S + WINDOW_S
PROBLEM_TTL_S = 600  # a problem not seen again for this long is taken as fixed
# Upper bounds (s) of the ChurnZero request-duration histogram that workers keep in Redis.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The kinds of ChurnZero problem the operator must act on: an answer that cannot be
# ChurnZero's (a redirect, a proxy's page), and a host that cannot be reached.
PROBLEM_KINDS = ("misconfigured", "dns", "tls", "refused", "connect_timeout")


def record_churnzero_problem(
    r: Any, kind: str, problem: str, detail: dict[str, str] | None = None,
    now: float | None = None,
) -> None:  # fmt: skip
    """Remember a ChurnZero problem of `kind` for status (sync Redis client): `problem`
    in words, and its detail (host, error, hint, diagnosis)."""
    when = time.time() if now is None else now
    entry = {**(detail or {}), "kind": kind, "problem": problem, "at": when}
    pipe = r.pipeline(transaction=False)
    pipe.hset(keys.CHURNZERO_PROBLEMS, kind, orjson.dumps(entry))
    pipe.expire(keys.CHURNZERO_PROBLEMS, PROBLEM_TTL_S)
    pipe.execute()


def clear_churnzero_problems(r: Any) -> None:
    """ChurnZero answered: the problems recorded are over."""
    r.delete(keys.CHURNZERO_PROBLEMS)


def churnzero_problems(r: Any, now: float | None = None) -> list[dict[str, Any]]:
    """The ChurnZero problems seen lately, newest first."""
    now = time.time() if now is None else now
    return _recent_problems(r.hgetall(keys.CHURNZERO_PROBLEMS).values(), now)


def _recent_problems(raw: Any, now: float) -> list[dict[str, Any]]:
    found = [orjson.loads(value) for value in raw]
    recent = [p for p in found if now - float(p.get("at", 0)) < PROBLEM_TTL_S]
    return sorted(recent, key=lambda p: -float(p.get("at", 0)))


def churnzero_problem(r: Any) -> dict[str, Any] | None:
    """The newest ChurnZero problem, while it is recent."""
    found = churnzero_problems(r)
    return found[0] if found else None


class Rate(StrEnum):
    """The events counted per second, for the rates over the last minute."""

    INGESTED = "ingested"
    DELIVERED = "delivered"


def rate_key(rate: Rate, now: float) -> str:
    """The key counting events of `rate` in the second of `now`."""
    return f"{keys.RATE}{rate.value}:{int(now)}"


def stage_rate(pipe: Any, rate: Rate, count: int, now: float) -> None:
    """Queue on a pipeline: count `count` events of `rate` in this second's bucket."""
    key = rate_key(rate, now)
    pipe.incrby(key, count)
    pipe.expire(key, RATE_TTL_S)


def stage_counts(pipe: Any, counts: dict[str, int]) -> None:
    """Queue on a pipeline: add to these fields of `keys.STATS` (zeros are left out)."""
    for name, value in counts.items():
        if value:
            pipe.hincrby(keys.STATS, name, value)


def stage_request_seconds(pipe: Any, durations: list[float]) -> None:
    """Queue on a pipeline: add request durations to the deployment-wide histogram."""
    if not durations:
        return
    per_bucket: dict[str, int] = {}
    for seconds in durations:
        bound = next((b for b in REQUEST_BUCKETS if seconds <= b), "+Inf")
        field_ = keys.Stat.REQUEST_SECONDS_BUCKET.of(str(bound))
        per_bucket[field_] = per_bucket.get(field_, 0) + 1
    per_bucket[keys.Stat.REQUEST_SECONDS_COUNT] = len(durations)
    per_bucket[keys.Stat.REQUEST_SECONDS_SUM_US] = int(sum(durations) * 1_000_000)
    stage_counts(pipe, per_bucket)


def request_histogram(stats: dict[str, int]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) buckets and the sum (s) of the histogram in `stats`."""
    running = 0
    buckets = []
    for bound in [*map(str, REQUEST_BUCKETS), "+Inf"]:
        running += stats.get(keys.Stat.REQUEST_SECONDS_BUCKET.of(bound), 0)
        buckets.append((bound, running))
    return buckets, stats.get(keys.Stat.REQUEST_SECONDS_SUM_US, 0) / 1_000_000


def counters(stats: dict[str, int]) -> dict[keys.Stat, dict[str, int]]:
    """The counters in `stats` by name, each by label ("" for an unlabelled one)."""
    out: dict[keys.Stat, dict[str, int]] = {}
    for name, value in stats.items():
        prefix, _, label = name.partition(":")
        try:
            stat = keys.Stat(prefix)
        except ValueError:  # not the relay's (another version's, or an operator's)
            continue
        out.setdefault(stat, {})[label] = value
    return out


@dataclass
class Snapshot:
    """The deployment's queue at one moment."""

    depth: dict[str, int]
    messages: int
    oldest_age_s: float
    paused_for_s: float
    dead_by_reason: dict[str, int]
    stats: dict[str, int] = field(default_factory=dict)
    memory_fraction: float = 0.0  # Redis used_memory / maxmemory; 0 when unlimited
    # The age of the oldest undelivered event in each state (`oldest.STATES`); 0: none.
    oldest_by_state: dict[str, float] = field(default_factory=dict)
    problems: list[dict[str, Any]] = field(default_factory=list)  # newest first


def _int(value: Any) -> int:
    return max(int(value or 0), 0)


def ready_events(counted: Any, messages: Any) -> int:
    """Events ready in the queue: the counter, believed only while the queue has messages.

    The counter can drift when a process dies between publishing and counting, or a
    message is redelivered; Celery's own list says for sure when the queue is empty.
    """
    return _int(counted) if _int(messages) else 0


def backlog(counted_ready: Any, delayed: Any, messages: Any) -> int:
    """Events waiting for delivery (ready and delayed): what the high-water mark limits."""
    return ready_events(counted_ready, messages) + _int(delayed)


def memory_fraction(memory: dict[str, Any]) -> float:
    """used_memory / maxmemory from INFO memory; 0 when maxmemory is 0 (unlimited)."""
    maxmemory = _int(memory.get("maxmemory"))
    return _int(memory.get("used_memory")) / maxmemory if maxmemory else 0.0


def snapshot(r: Any, now: float | None = None) -> Snapshot:
    """Read everything in one round trip (sync redis client)."""
    now = time.time() if now is None else now
    pipe = r.pipeline(transaction=False)
    pipe.get(keys.DEPTH_READY)
    pipe.get(keys.DEPTH_INFLIGHT)
    pipe.get(keys.DELAYED_EVENTS)
    pipe.llen(keys.QUEUE)
    pipe.llen(keys.REPLAY_QUEUE)
    pipe.get(keys.PAUSE_UNTIL)
    pipe.hgetall(keys.STATS)
    pipe.hlen(keys.CELERY_UNACKED)
    pipe.info("memory")
    pipe.hgetall(keys.CHURNZERO_PROBLEMS)
    oldest.stage_read(pipe)
    for reason in Reason:
        pipe.zcard(keys.dlq_reason(reason))
    found = pipe.execute()
    ready, inflight, delayed, live, replay, pause, stats, unacked, memory, problems = found[:10]
    ages = oldest.ages(found[10 : 10 + oldest.READS], now)
    dead = found[10 + oldest.READS :]
    messages = _int(live) + _int(replay)
    if not unacked:  # as for ready_events: nothing unacked, nothing in flight
        inflight = 0
    dead_by_reason = {reason.value: _int(d) for reason, d in zip(Reason, dead, strict=True)}
    return Snapshot(
        depth={
            "ready": ready_events(ready, messages),
            "in_flight": _int(inflight),
            "delayed": _int(delayed),
            "dead": sum(dead_by_reason.values()),
        },
        messages=_int(messages),
        oldest_age_s=max(ages.values()),
        oldest_by_state=ages,
        paused_for_s=max(float(pause or 0) / 1000 - now, 0.0),
        dead_by_reason=dead_by_reason,
        stats={(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in stats.items()},
        memory_fraction=memory_fraction(memory),
        problems=_recent_problems(problems.values(), now),
    )


def rates(r: Any, now: float | None = None) -> dict[str, Any]:
    """Per-second counts of the last minute for ingested and delivered events."""
    now = time.time() if now is None else now
    # The current second is still filling up; the minute ends with the last full one.
    seconds = [int(now) - WINDOW_S + i for i in range(WINDOW_S)]
    out: dict[str, Any] = {}
    for rate in Rate:
        values = r.mget([rate_key(rate, s) for s in seconds])
        series = [int(v or 0) for v in values]
        out[rate.value] = {"per_s": round(sum(series) / WINDOW_S, 2), "series": series}
    return out


def history(r: Any, now: float | None = None) -> dict[str, Any]:
    """Events ingested and delivered per `HISTORY_STEP_S` over the last `HISTORY_S`
    (oldest first, the last step ending with the last full second), from the per-second
    counts."""
    now = time.time() if now is None else now
    end = int(now)
    start = end - HISTORY_S
    out: dict[str, Any] = {"end": end, "step_s": HISTORY_STEP_S}
    for rate in Rate:
        values = r.mget([rate_key(rate, s) for s in range(start, end)])
        steps = [0] * (HISTORY_S // HISTORY_STEP_S)
        for i, v in enumerate(values):
            if v:
                steps[i // HISTORY_STEP_S] += int(v)
        out[rate.value] = steps
    return out


def report(r: Any) -> dict[str, Any]:
    """Everything `relay status --json` prints."""
    now = time.time()
    snap = snapshot(r, now)
    rate, limit_met = learned_rate(r)
    return {
        "time": now,
        "depth": snap.depth,
        "messages": snap.messages,
        "oldest_age_s": round(snap.oldest_age_s, 3),
        "oldest_age_by_state_s": snap.oldest_by_state,
        "paused_for_s": round(snap.paused_for_s, 3),
        "redis_memory_fraction": round(snap.memory_fraction, 4),
        "dead_letters": snap.dead_by_reason,
        "rates": rates(r, now),
        "recent": recent.read(r, now),
        "counters": snap.stats,
        "churnzero_problem": snap.problems[0] if snap.problems else None,
        "churnzero_problems": snap.problems,
        "names": names.report(r),
        "replay": replay_progress(r, snap.stats),
        "learned_rate_rps": rate,
        "rate_limit_met": limit_met,
        "parked": parking.counts(r),
        "archive": archive_status(r, snap.stats, now),
    }


def archive_status(r: Any, stats: dict[str, int], now: float) -> dict[str, Any]:
    """The flight recorder: the archiver's lag (settlements not yet in the files, the
    oldest one's age), records archived so far and the archiver's errors."""
    by_stat = counters(stats)
    return {
        **archive.lag(r, now),
        "archived": stats.get(keys.Stat.ARCHIVED, 0),
        "errors": sum(by_stat.get(keys.Stat.ARCHIVER_ERRORS, {}).values()),
    }


def replay_progress(r: Any, stats: dict[str, int]) -> dict[str, int]:
    """The replay lane: messages waiting in it, events replayed and delivered so far."""
    return {
        "queued_messages": int(r.llen(keys.REPLAY_QUEUE)),
        "replayed": stats.get(keys.Stat.REPLAYED, 0),
        "delivered": stats.get(keys.Stat.REPLAY_DELIVERED, 0),
    }


def learned_rate(r: Any) -> tuple[float | None, bool]:
    """The self-tuning rate (requests/s) the workers use (None before any report), and
    whether a 429 has cut it yet (before that it only says how far it has grown)."""
    rate, cut_at = r.hmget(keys.ADAPTIVE_RATE, ["rate", "cut_at"])
    return (round(float(rate), 2) if rate else None), float(cut_at or 0) > 0
