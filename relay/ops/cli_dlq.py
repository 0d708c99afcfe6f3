"""`relay dlq`: list, show, replay, purge and export dead letters.

Replay and purge act on a `deadletter.Selection`, made by the same `select` as the admin
API's; only the words of a refusal differ, since each names its own options.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from relay.ops import cli_ops
from relay.ops.cli_context import Deployment, pass_deployment, show
from relay.reasons import Reason
from relay.state import deadletter


# ParamType is generic only in recent click, and the relay allows click 8.1.
class Moment(click.ParamType):  # type: ignore[type-arg]
    """A point in time: unix seconds, or a date and time (UTC unless it says otherwise)."""

    name = "time"
    _dates = click.DateTime(
        ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]
    )

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """Unix seconds as a float."""
        if isinstance(value, float):
            return value
        try:
            return float(value)
        except ValueError:
            pass
        try:
            when = self._dates.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(
                f"{value!r} is neither unix time nor a date and time such as 2024-06-10, "
                "2024-06-10T06:00:00 (UTC) or 2024-06-10T08:00:00+02:00",
                param, ctx,
            )  # fmt: skip
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _reason(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Reason | None:
    return None if value is None else Reason(value)


_REASON = click.option(
    "--reason", type=click.Choice([reason.value for reason in Reason]), default=None,
    callback=_reason, metavar="REASON",
    help=f"Only entries with this reason ({', '.join(Reason)}).",
)  # fmt: skip
_SINCE = click.option(
    "--since", type=Moment(), default=None,
    help="Failed at/after (unix time, or a UTC date and time: 2024-06-10T06:00:00).",
)  # fmt: skip
_UNTIL = click.option("--until", type=Moment(), default=None, help="Failed at/before (as --since).")


@click.group()
def dlq() -> None:
    """Inspect, replay, purge and export dead letters."""


@dlq.command("list")
@_REASON
@_SINCE
@_UNTIL
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_deployment
def dlq_list(
    deployment: Deployment, reason: Reason | None, since: float | None, until: float | None,
    limit: int, as_json: bool,
) -> None:  # fmt: skip
    """The newest dead letters."""
    from rich.console import Console
    from rich.table import Table

    r = deployment.redis
    entries = deadletter.list_entries(r, reason=reason, since=since, until=until, limit=limit)
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.as_dict()))
        return
    table = Table(show_header=True, header_style="bold")
    for column in ("id", "reason", "status", "attempts", "last failure", "event"):
        table.add_column(column)
    for e in entries:
        event = e.item.get("event")
        what = (
            f"{event.get('type')} {event.get('event') or ''} {event.get('userId') or ''}".strip()
            if isinstance(event, dict) else str(event)[:40]
        )  # fmt: skip
        when = datetime.fromtimestamp(e.last_failure, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(e.id, e.reason.value, str(e.status or ""), str(e.attempts), when, what)
    total = deadletter.count(r, reason=reason, since=since, until=until)
    Console().print(table)
    click.echo(f"{len(entries)} of {total} shown")


@dlq.command("show")
@click.argument("entry_id")
@pass_deployment
def dlq_show(deployment: Deployment, entry_id: str) -> None:
    """One dead letter, whole, as JSON."""
    entry = deadletter.get(deployment.redis, entry_id)
    show(entry and entry.as_dict(), f"no dead letter {entry_id}")


def _select(
    ids: tuple[str, ...], every: bool, reason: Reason | None, since: float | None,
    until: float | None,
) -> deadletter.Selection:  # fmt: skip
    try:
        return deadletter.select(ids, every=every, reason=reason, since=since, until=until)
    except deadletter.SelectionError as exc:
        raise click.UsageError(
            "give ids, or --all / --reason, not both" if exc.mixed
            else "give entry ids, --all or --reason"
        ) from None  # fmt: skip


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead letter (with the filters).")
@_REASON
@_SINCE
@_UNTIL
@click.option("--dry-run", is_flag=True, help="Say what a replay would do; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: machine-readable.")
@pass_deployment
def dlq_replay(
    deployment: Deployment, ids: tuple[str, ...], every: bool, reason: Reason | None,
    since: float | None, until: float | None, dry_run: bool, as_json: bool,
) -> None:  # fmt: skip
    """Send dead letters through the normal path again (translation re-runs)."""
    from rich.progress import Progress

    selection = _select(ids, every, reason, since, until)
    r = deployment.redis
    if dry_run:
        _print_dry_run(deployment, selection, as_json)
        return
    # Replays go to their own lane: a bounded share of the rate while live events flow.
    per_message = deployment.settings.churnzero_batch_size
    total = selection.count(r)
    replayed = 0
    with Progress(disable=total < 1000) as progress:
        task = progress.add_task("replaying", total=total)
        for page in selection.pages(r):
            replayed += deadletter.replay(r, page, deployment.queue, per_message)
            progress.update(task, advance=len(page))
    click.echo(f"replayed {replayed} of {total}")


def _print_dry_run(deployment: Deployment, selection: deadletter.Selection, as_json: bool) -> None:
    """`relay dlq replay --dry-run`: what a replay of the selected entries would do now."""
    from relay.ops import preview

    settings, r = deployment.settings, deployment.redis
    pages = preview.entries_pages(
        r, reason=selection.reason, ids=list(selection.ids) or None,
        since=selection.since, until=selection.until,
    )  # fmt: skip
    result = preview.dry_run(r, pages, cli_ops.mapping_of(settings), settings)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(f"dry run: a replay of {result.total:,} dead letters now would")
    for label, n in result.outcomes.most_common():
        click.echo(f"  {n:>9,}  {cli_ops.words(label)}")
    for label, examples in result.samples.items():
        click.echo(f"\nfor example, {cli_ops.words(label)}:")
        for example in examples:
            click.echo(f"  entry {example['entry']}")
            for command in example["commands"][:5]:
                click.echo("    " + json.dumps(command))
            for error in example["errors"][:3]:
                click.echo(f"    ! {error if isinstance(error, str) else json.dumps(error)}")
    click.echo("\n(dry run: nothing was sent or changed)")


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True)
@_REASON
@_SINCE
@_UNTIL
@click.option("--yes", is_flag=True, help="Really delete.")
@pass_deployment
def dlq_purge(
    deployment: Deployment, ids: tuple[str, ...], every: bool, reason: Reason | None,
    since: float | None, until: float | None, yes: bool,
) -> None:  # fmt: skip
    """Delete dead letters for good (asks for --yes)."""
    selection = _select(ids, every, reason, since, until)
    r = deployment.redis
    total = selection.count(r)
    if not yes:
        raise click.ClickException(f"this deletes {total} dead letters for good; add --yes")
    purged = sum(deadletter.purge(r, page) for page in selection.pages(r))
    click.echo(f"purged {purged}")


@dlq.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_REASON
@pass_deployment
def dlq_export(deployment: Deployment, file: str, reason: Reason | None) -> None:
    """Write dead letters as JSON Lines to FILE (- for stdout)."""
    r = deployment.redis
    with click.open_file(file, "wb") as out:
        written = deadletter.export(r, out.write, reason=reason)
    click.echo(f"exported {written}", err=True)
