"""The status report operators read: depths, rates over the last minute, oldest age,
dead letters by reason. Shared by `relay status`, `/admin/api/status` and the admin page."""

from __future__ import annotations

import time
from typing import Any

from relay import keys, queue_state

WINDOW_S = 60


def stage_rate(pipe: Any, name: str, count: int, now: float) -> None:
    """Queue on a pipeline: count `count` events of `name` in this second's bucket."""
    key = f"{keys.RATE}{name}:{int(now)}"
    pipe.incrby(key, count)
    pipe.expire(key, 3 * WINDOW_S)


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
        "dead_letters": snap.dead_by_reason,
        "rates": rates(r, now),
        "counters": snap.stats,
    }
