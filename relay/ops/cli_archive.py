"""The flight recorder's commands: `relay search` and `relay replay` (its settled events,
found by id, user, account, event or outcome, and a slice of them sent again) and
`relay archive` (its archiver, and its maintenance on demand).

Search and replay read the archive's files (relay.archive.store) and the records the
archiver has not yet written, in the running relay's Redis. `relay archive` runs the
archiver (relay.archive.archiver) in this process: for operators who run it as a service
of its own; `relay worker` runs one as its child unless RELAY_ARCHIVE or
RELAY_WORKER_ARCHIVER is false. `relay archive compact` runs retention and compaction once.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
import redis

from relay.ops import cli_ops
from relay.ops.cli_context import Deployment, pass_deployment

_FILTERS = (
    ("--message-id", "message_id", "Segment's messageId."),
    ("--user", "user_id", "userId."),
    ("--anonymous-id", "anonymous_id", "anonymousId."),
    ("--account", "account_id", "The ChurnZero account id."),
    ("--event", "event", "A track's event name."),
    ("--outcome", "outcome", "delivered, skipped or dead."),
    ("--reason", "reason", "Why it was skipped or dead-lettered (e.g. unknown_event)."),
)
_TIMES = (
    ("--since", "since", "Settled at/after: 2h, 7d (ago), 2026-12-01, 2026-12-01T06:00:00Z."),
    ("--until", "until", "Settled at/before (as --since; `now`)."),
)


def _filters(func: Any) -> Any:
    for flag, name, text in reversed(_FILTERS + _TIMES):
        func = click.option(flag, name, default=None, metavar="TEXT", help=text)(func)
    return func


def _given(filters: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in filters.items() if v not in (None, "")}


def when(seconds: float | None) -> str:
    """A unix time as the CLI prints it (UTC)."""
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.command("search")
@_filters
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: one hit per line.")
@pass_deployment
def search_command(deployment: Deployment, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Settled events in the archive (and those not yet archived), newest first: each
    with its event, outcome, the commands sent and every try."""
    from rich.console import Console
    from rich.table import Table

    from relay.archive import search
    from relay.archive.store import open_store

    query = search.Query.of(_given(filters), time.time())
    # With no relay here (a host that only reads the bucket), the files alone.
    r = deployment.redis if deployment.running_redis_url_or_none else None
    hits = search.search(open_store(deployment.settings), r, query, limit)
    if as_json:
        for hit in hits:
            click.echo(json.dumps(hit))
        return
    table = Table(show_header=True, header_style="bold", show_lines=True)
    for column in ("settled (UTC)", "outcome", "event", "commands sent", "tries"):
        table.add_column(column, overflow="fold")
    for h in hits:
        outcome = h["outcome"] + (f"\n{h['reason']}" if h["reason"] else "")
        who = " ".join(
            part for part in (
                h["type"], h["event"] and repr(h["event"]), h["user_id"] and f"user {h['user_id']}",
                h["account_id"] and f"account {h['account_id']}",
            ) if part
        )  # fmt: skip
        message = f"messageId {h['message_id']}" if h["message_id"] else "no messageId"
        event = (
            f"{who}\n{message}, relay id {h['relay_id']}\n"
            f"{json.dumps(h['body']) if h['body'] is not None else '(no event kept)'}"
        )
        commands = "\n".join(json.dumps(c) for c in h["commands"] or [])
        tries = "\n".join(
            f"{when(t.get('at'))} {t.get('status') or ''} {t.get('error') or ''}".strip()
            for t in h["tries"] or []
        )
        table.add_row(when(h["settled_at"]), outcome, event, commands, tries)
    Console().print(table)
    alone = "" if r is not None else "; no relay here: the archive's files only"
    click.echo(f"{len(hits)} shown (newest first; --limit {limit}{alone})")


@click.command("replay")
@_filters
@click.option("--dry-run", is_flag=True, help="Say what the replay would do; change nothing.")
@click.option("--yes", is_flag=True, help="Really send (a replay asks for it).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: machine-readable.")
@pass_deployment
def replay_command(
    deployment: Deployment, /, dry_run: bool, yes: bool, as_json: bool, **filters: Any
) -> None:
    """Send a slice of the archive (--since and --until required) again, through the
    replay lane with the current mapping. The same command again continues it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from relay.archive import replay
    from relay.archive.store import open_store

    settings, r = deployment.settings, deployment.redis
    store = open_store(settings)
    job = replay.Replay.of(r, _given(filters))
    if dry_run:
        _print_dry_run(deployment, job, as_json)
        return
    with job.reader(store, r) as reader:
        total = job.total(reader)
    left = total - job.done
    window = f"{when(job.query.since)} to {when(job.query.until)} UTC"
    if left <= 0:
        click.echo(f"replay {job.id} ({window}): all {total:,} events replayed already")
        return
    if not yes:
        raise click.ClickException(
            f"replay {job.id} ({window}) sends {left:,} archived events again"
            f"{f' (continuing: {job.done:,} sent before)' if job.done else ''}; "
            "see --dry-run, then add --yes"
        )
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())  # fmt: skip
    try:
        with Progress(*columns) as progress:
            task = progress.add_task("replaying", total=total, completed=job.done)
            for step in job.run(r, store, deployment.queue, settings.churnzero_batch_size,
                                total=total):  # fmt: skip
                progress.update(task, completed=step.done + step.skipped)
    except KeyboardInterrupt:
        job = replay.Replay.of(r, _given(filters))  # as Redis has it: a page is all or none
        left = total - job.done - job.skipped
        click.echo(
            f"\ninterrupted: {job.done:,} of {total:,} replayed, {left:,} left; "
            "the same command continues"
        )
        raise SystemExit(130) from None
    note = f", {job.skipped:,} without an event kept" if job.skipped else ""
    click.echo(f"replay {job.id}: {job.done:,} of {total:,} replayed{note}")


def _print_dry_run(deployment: Deployment, job: Any, as_json: bool) -> None:
    """What the replay would do now, by the worker's own stages (relay.ops.preview)."""
    from relay.ops import preview

    settings, r = deployment.settings, deployment.redis
    store = open_store_of(deployment)
    now = time.time()
    with job.reader(store, r) as reader:

        def pages() -> Any:
            for page in job.pages(reader):
                items = [job.envelope(record, now) for record in page]
                yield [(i.id, i) for i in items if i is not None]

        result = preview.dry_run_items(
            r, pages(), cli_ops.mapping_of(settings), settings, name="relay_id"
        )
    if as_json:
        click.echo(json.dumps({"replay": job.id, "already_replayed": job.done, **result.as_dict()}))
        return
    window = f"{when(job.query.since)} to {when(job.query.until)} UTC"
    already = f" ({job.done:,} replayed already)" if job.done else ""
    click.echo(f"dry run: replay {job.id} of {result.total:,} events ({window}){already} would")
    cli_ops.echo_dry_run(result, "relay id", "relay_id")


def open_store_of(deployment: Deployment) -> Any:
    """The deployment's archive."""
    from relay.archive.store import open_store

    return open_store(deployment.settings)


@click.group(name="archive", invoke_without_command=True)
@click.pass_context
def archive_group(ctx: click.Context) -> None:
    """Move settled events' records from Redis into the archive's files (until Ctrl-C);
    `compact` drops old days and forgotten users' rows now."""
    if ctx.invoked_subcommand is not None:
        return
    from relay import logs
    from relay.archive import archiver

    deployment = ctx.ensure_object(Deployment)
    settings = deployment.settings
    logs.configure(settings.log_level, settings.log_format)
    if not settings.archive:
        # Records written while it was on still wait in Redis: drain them.
        click.echo("RELAY_ARCHIVE is false: workers record nothing; archiving what is left")
    sys.exit(archiver.main(settings, _client(deployment)))


@archive_group.command()
@pass_deployment
def compact(deployment: Deployment) -> None:
    """Drop the days older than RELAY_ARCHIVE_DAYS, merge each day's small files into a
    few large ones, and rewrite the files that still hold rows of deleted users without
    them."""
    from relay.archive import maintenance
    from relay.archive.store import open_store

    store = open_store(deployment.settings)
    done = maintenance.run(store, deployment.redis, deployment.settings.archive_days, time.time())
    click.echo(json.dumps(done))


def _client(deployment: Deployment) -> redis.Redis:
    from relay.state import redis_conn

    return redis_conn.sync_client(deployment.settings, deployment.running_redis_url)
