"""`python -m tests.bench [names...]`: run the benchmarks (all, or those named), write
`bench-results/<name>.json` for each and print a markdown table of the figures.

Targets are reported, not asserted: the exit status is 1 only when a benchmark could
not run at all.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from tests.bench import adaptive, e2e, harness, ingest, ratelimit, replay, wait, wrk
from tests.bench.harness import Env, say

BENCHMARKS: dict[str, Callable[[Env], dict[str, Any]]] = {
    "ingest_webhook": ingest.ingest_webhook,
    "ingest_batch": ingest.ingest_batch,
    "ingest_processes": ingest.ingest_processes,
    "e2e": e2e.e2e,
    "ratelimit": ratelimit.ratelimit,
    "replay": replay.replay,
    "adaptive": adaptive.adaptive,
    "ingest_wait": wait.ingest_wait,
}


def _figure(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _extra(result: dict[str, Any]) -> str:
    name = result["name"]
    if name.startswith("ingest"):
        return (
            f"2xx {result['answered_2xx']:,}, non-2xx {result['non_2xx']:,}, "
            f"queued {result['queued_events']:,}"
        )
    if name == "e2e":
        return f"worker RSS {result['worker_rss_mb']:.0f} MB, p50 {result['p50_ms']:.0f} ms"
    if name == "replay":
        return (
            f"live p99 {result['live_alone']['p99_ms']:.0f} -> "
            f"{result['live_beside_replay']['p99_ms']:.0f} ms beside a {result['dead_letters']:,}"
            f"-event replay ({result['replay_events_per_s_meanwhile']:,.0f} events/s meanwhile)"
        )
    if name in ("ratelimit", "adaptive"):
        return (
            f"achieved {result['achieved_rps']:.1f}/{result['limit_rps']:g} rps, "
            f"throttled {result['throttled_fraction']:.2%}"
        )
    return ""


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| benchmark | events/s | baseline/s | ratio | CPU ratio | p99 ms | other | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | - | - | - | - | - | error: {r['error']} | - | no |")
            continue
        lines.append(
            f"| {r['name']} | {_figure(r.get('events_per_s'), 0)} "
            f"| {_figure(r.get('baseline_per_s'), 0)} | {_figure(r.get('ratio'), 2)} "
            f"| {_figure(r.get('cpu_ratio'), 2)} | {_figure(r.get('p99_ms'), 1)} "
            f"| {_extra(r)} | {r['target']} | {_figure(r['met'])} |"
        )
    return "\n".join(lines)


def _terminate(signum: int, _: Any) -> NoReturn:
    # Unwind through every `finally`, so the children are killed and the database flushed.
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"default: all of {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    signal.signal(signal.SIGTERM, _terminate)
    if any(name.startswith("ingest") for name in names):
        wrk.ensure()  # before any process starts: it may need apt-get
    env = Env()
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for name in names:
            say(f"{name}: starting")
            began = time.monotonic()
            load_before = os.getloadavg()[0]
            try:
                result = BENCHMARKS[name](env)
            except Exception as exc:  # one broken benchmark must not hide the others
                traceback.print_exc()
                result = {"name": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                result.update(
                    events_per_s=None, baseline_per_s=None, ratio=None, p99_ms=None,
                    target=None, met=False,
                )  # fmt: skip
            result["seconds"] = round(time.monotonic() - began, 1)
            # The machine is shared: how busy it was says how far to trust the figures.
            result["loadavg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
            result["redis_persistence"] = env.persistence
            path = harness.write_result(result)
            say(f"{name}: done in {result['seconds']} s -> {path.relative_to(harness.ROOT)}")
            results.append(result)
    finally:
        env.close()
    say(f"all done in {time.monotonic() - started:.0f} s")
    print(f"Redis: {env.persistence}; load average (1 min) {os.getloadavg()[0]:.2f} at the end\n")
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
