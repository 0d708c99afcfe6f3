"""`relay status` as a table: the report of relay.state.status in rows an operator reads.

Figures only where they say something (an oldest age per state only when one waits, the
last minutes' latency only when events were delivered), every ChurnZero problem with
what to check, and new names as a count with a pointer to `relay names list`.
"""

from __future__ import annotations

from typing import Any

_STATE_WORDS = {
    "ready": "ready",
    "in_flight": "in flight",
    "delayed": "delayed (retries)",
    "identity_wait": "waiting for identity",
}


def table(data: dict[str, Any], rate_cap_rps: float) -> Any:
    """The status report (relay.state.status.report) as a rich table; `rate_cap_rps`:
    the most the self-tuning rate may reach."""
    from rich.table import Table

    table = Table(title="churnzero-relay", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("events", justify="right")
    depth = data["depth"]
    table.add_row("ready", f"{depth['ready']:,}")
    table.add_row("in flight", f"{depth['in_flight']:,}")
    table.add_row("delayed (retries)", f"{depth['delayed']:,}")
    table.add_row("dead letters", f"{depth['dead']:,}")
    table.add_row("oldest undelivered", f"{data['oldest_age_s']:.1f} s")
    for state, age in data["oldest_age_by_state_s"].items():
        if age:
            table.add_row(f"  oldest {_STATE_WORDS.get(state, state)}", f"{age:.1f} s")
    table.add_row("ingested /s (1 min)", f"{data['rates']['ingested']['per_s']:,}")
    table.add_row("delivered /s (1 min)", f"{data['rates']['delivered']['per_s']:,}")
    _recent_rows(table, data["recent"])
    if data["redis_memory_fraction"]:
        table.add_row("Redis memory (of maxmemory)", f"{data['redis_memory_fraction']:.0%}")
    replay = data["replay"]
    if replay["replayed"] or replay["queued_messages"]:
        table.add_row(
            "replay lane",
            f"{replay['delivered']:,} of {replay['replayed']:,} delivered, "
            f"{replay['queued_messages']:,} messages queued",
        )
    if data["learned_rate_rps"] is not None:
        if data["rate_limit_met"]:
            table.add_row("learned rate", f"{data['learned_rate_rps']:,} req/s")
        else:
            table.add_row("learned rate", f"no limit met yet (cap {rate_cap_rps:,.0f})")
    parked = data.get("parked") or {}
    if parked.get("users"):
        table.add_row("parked traits", f"{parked['traits']:,} of {parked['users']:,} users "
                      "waiting for an account")  # fmt: skip
    archive = data.get("archive") or {}
    if archive.get("entries") or archive.get("archived"):
        table.add_row(
            "archive",
            f"{archive['archived']:,} archived, {archive['entries']:,} settlements waiting "
            f"(oldest {archive['oldest_age_s']:.1f} s)",
        )
    if archive.get("errors"):
        table.add_row("[yellow]archiver errors[/]", f"{archive['errors']:,}: see its log")
    if data["paused_for_s"]:
        table.add_row("[yellow]ChurnZero paused[/]", f"{data['paused_for_s']:.1f} s")
    for problem in data["churnzero_problems"]:
        _problem_rows(table, problem)
    for reason, n in data["dead_letters"].items():
        if n:
            table.add_row(f"  dead: {reason}", f"{n:,}")
    held = data["names"]["held"]
    for row in held[:10]:
        table.add_row(f"[yellow]held new name[/] {row['kind']}", row["name"])
    if len(held) > 10:
        table.add_row("[yellow]held new names[/]", f"{len(held) - 10:,} more: relay names list")
    if data["names"]["new"]:
        table.add_row("new names (newest)", f"{len(data['names']['new']):,}: relay names list")
    return table


def _recent_rows(table: Any, recent: dict[str, Any]) -> None:
    minutes = recent["minutes"]
    latency = recent["delivery_latency_s"]
    if latency["count"]:
        table.add_row(
            f"delivery latency ({minutes} min)",
            f"p50 {latency['p50']:,.2f} s, p99 {latency['p99']:,.2f} s",
        )
    answers = recent["ingest_requests"]
    if answers["4xx"]:
        refused = ", ".join(f"{k} x{v:,}" for k, v in answers["4xx_by_route"].items())
        table.add_row(f"[yellow]ingest 4xx ({minutes} min)[/]", refused)


_PROBLEM_WORDS = {
    "misconfigured": "ChurnZero misconfigured",
    "dns": "ChurnZero host does not resolve",
    "tls": "ChurnZero TLS failed",
    "refused": "ChurnZero refused connections",
    "connect_timeout": "ChurnZero connect timeout",
}


def _problem_rows(table: Any, problem: dict[str, Any]) -> None:
    kind = problem.get("kind", "misconfigured")
    table.add_row(f"[red]{_PROBLEM_WORDS.get(kind, kind)}[/]", problem["problem"])
    if problem.get("hint"):
        table.add_row("  what to check", problem["hint"])
