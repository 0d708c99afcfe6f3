"""`python -m tests.bench [names...]`: run the benchmarks (all, or those named), write
`bench-results/<name>.json` for each and print a markdown table of the figures.

The table is also written into docs/benchmarks.md, between its markers, one row per
benchmark with when and on which commit it ran (tests.bench.page; `--no-page` leaves the
page alone).

`--baseline REF` makes `e2e` an A/B run (`e2e_ab`, tests.bench.ab): today's worker
against REF's, alternated rounds. `--profile` samples the live worker with py-spy during
e2e's throughput load and prints where its CPU went (tests.bench.profile).

Targets are reported, not asserted: the exit status is 1 only when a benchmark could
not run at all.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from tests.bench import (
    ab,
    adaptive,
    archive,
    archive_cost,
    e2e,
    harness,
    ingest,
    page,
    profile,
    ratelimit,
    replay,
    wait,
    wrk,
)
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
    "archive_lookup": archive.archive_lookup,
    "archive_replay": archive.archive_replay,
    "archive_small_files": archive.archive_small_files,
    "archive": archive_cost.archive,
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
        relay = result.get("relay", {})
        per = result.get("events_per_request", 1)
        rounds = relay.get("rounds_rps") or []
        spread = (
            f"rounds {min(rounds) * per:,.0f}-{max(rounds) * per:,.0f}/s, "
            if len(rounds) > 1
            else ""
        )
        # What the server did with the CPU it got: the figure the machine's load moves least.
        cpu_us = relay.get("server_cpu_us_per_request")
        per_cpu = (
            f"{per * 1e6 / cpu_us:,.0f}/CPU-s on {relay['server_cpu_utilisation']:.2f} core, "
            if cpu_us
            else ""
        )
        return (
            f"{spread}{per_cpu}2xx {result['answered_2xx']:,}, non-2xx {result['non_2xx']:,}, "
            f"queued {result['queued_events']:,}; Redis stalls: "
            f"{relay.get('aof_delayed_fsync', 0)} postponed fsyncs, "
            f"{relay.get('redis_forks', 0)} forks"
        )
    if name == "e2e":
        rounds = ", ".join(f"{r:,.0f}" for r in result.get("rounds_events_per_s", []))
        return (
            f"median of rounds {rounds}; worker RSS {result['worker_rss_mb']:.0f} MB, "
            f"CPU {result['throughput']['worker_cpu_us_per_event']:.0f} µs/event, "
            f"p50 {result['p50_ms']:.0f} ms"
        )
    if name == "e2e_ab":
        ref = result["baseline_ref"]
        rounds = ", ".join(f"{r['ratio']:.2f}" for r in result["rounds"])
        return (
            f"current / {ref}, median of {len(result['rounds'])} alternated rounds "
            f"({rounds}); worker RSS "
            f"{result['worker_rss_mb']:.0f} MB ({ref}: {result['baseline_worker_rss_mb']:.0f}), "
            f"CPU {result['worker_cpu_us_per_event']:.0f} µs/event "
            f"({ref}: {result['baseline_worker_cpu_us_per_event']:.0f})"
        )
    if name == "replay":
        return (
            f"live p99 {result['live_alone']['p99_ms']:.0f} -> "
            f"{result['live_beside_replay']['p99_ms']:.0f} ms beside a {result['dead_letters']:,}"
            f"-event replay ({result['replay_events_per_s_meanwhile']:,.0f} events/s meanwhile)"
        )
    if name == "archive_lookup":
        p50, p95 = result["p50_ms"], result["p95_ms"]
        return (
            f"{result['archived_events']:,} events, {result['days']} days, "
            f"{result['files']} files, {result['bytes_per_event']:.0f} bytes each; "
            f"messageId p50/p95 {p50['message_id']:.0f}/{p95['message_id']:.0f} ms, "
            f"userId {p50['user_id']:.0f}/{p95['user_id']:.0f} ms"
        )
    if name == "archive_replay":
        return f"{result['replayed']:,} events queued in {result['seconds']:.2f} s"
    if name == "archive_small_files":
        small, merged = result["p50_ms_small_files"], result["p50_ms_consolidated"]
        return (
            f"one day, {result['events']:,} events: {result['files_before']:,} files, "
            f"messageId/userId p50 {small['message_id']:.0f}/{small['user_id']:.0f} ms; "
            f"consolidated in {result['consolidate_s']:.0f} s into {result['files_after']} "
            f"files: {merged['message_id']:.0f}/{merged['user_id']:.0f} ms"
        )
    if name == "archive":
        return (
            f"on / off, median of {len(result['ratios'])} alternated rounds "
            f"({', '.join(f'{r:.2f}' for r in result['ratios'])}); "
            f"{_figure(result['bytes_per_event'])} B on disk per archived event; "
            f"caught up {result['catch_up_s']:.1f} s after the last delivery"
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


def _commit() -> str:
    """The short hash of HEAD, with "+" when the tree has changes ("?" outside git)."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=harness.ROOT, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else "?"

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain") else "")


def _terminate(signum: int, _: Any) -> NoReturn:
    # Unwind through every `finally`, so the children are killed and the database flushed.
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"default: all of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--baseline", metavar="REF", help="e2e: A/B against this commit's worker (e.g. b324a8f)"
    )
    parser.add_argument(
        "--rounds", type=int, default=ab.ROUNDS, help="e2e --baseline: alternated rounds"
    )
    parser.add_argument(
        "--events", type=int, default=e2e.EVENTS, help="e2e: tracks in the throughput load"
    )
    parser.add_argument(
        "--profile", action="store_true", help="e2e: py-spy the live worker under load"
    )
    parser.add_argument(
        "--no-page", action="store_true", help="do not write the table into docs/benchmarks.md"
    )
    args = parser.parse_args()
    if args.baseline:
        BENCHMARKS["e2e"] = functools.partial(
            ab.e2e_ab, ref=args.baseline, rounds=args.rounds, events=args.events
        )
    else:
        BENCHMARKS["e2e"] = functools.partial(e2e.e2e, events=args.events, spy=args.profile)
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
    if not args.no_page and not args.profile:  # a profiled run's rates are not figures
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        run = page.Run(when=when, commit=_commit(), load=os.getloadavg()[0])
        failed = {r["name"] for r in results if "error" in r}
        written = page.write(table(results), run, failed)
        say(f"table written to {written.relative_to(harness.ROOT)} (failed rows kept as they were)")
    if args.profile and e2e.PROFILE_PATH.exists() and not args.baseline:
        cpu = next((r["throughput"]["worker_cpu_us_per_event"] for r in results
                    if r.get("name") == "e2e" and "throughput" in r), None)  # fmt: skip
        cpu_profile = profile.summary(e2e.PROFILE_PATH).as_dict()
        print("\n" + profile.headline(cpu_profile, cpu))
        print("\n" + profile.render(cpu_profile, cpu))
        wall = profile.summary(e2e.wall_profile(e2e.PROFILE_PATH), within=profile.POOL_FRAME)
        print("\n" + profile.render(wall.as_dict(), title="wall profile of the pool threads"))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
