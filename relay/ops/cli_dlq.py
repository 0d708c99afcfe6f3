"""`relay dlq`: list, show, replay, purge and export dead letters.

Replay and purge act on a `deadletter.Selection`, made by the same `select` as the admin
API's; only the words of a refusal differ, since each names its own options.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from relay.ops import cli_ops
from relay.ops.cli_context import Deployment, pass_deployment, show
from relay.reasons import Reason
from relay.state import deadletter, deadletter_query


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


ID_PREFIX = 12  # characters of an id a narrow table shows


@click.group()
def dlq() -> None:
    """Inspect, replay, purge and export dead letters."""


def _resolved(deployment: Deployment, given: tuple[str, ...]) -> tuple[str, ...]:
    """Full ids for ids or unique prefixes; a one-line refusal, nothing done, otherwise."""
    try:
        return tuple(deadletter_query.resolve_all(deployment.redis, given))
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None


@dlq.command("list")
@_REASON
@_SINCE
@_UNTIL
@click.option("--user", default=None, help="Only this user's (userId or anonymousId).")
@click.option("--event", default=None, help="Only this event (a track's name, or a type).")
@click.option("--message-id", default=None, help="Only the event with this messageId.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True,
    help="Skip this many (newest first): the next page's offset is printed.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@pass_deployment
def dlq_list(
    deployment: Deployment, reason: Reason | None, since: float | None, until: float | None,
    user: str | None, event: str | None, message_id: str | None, limit: int, offset: int,
    as_json: bool,
) -> None:  # fmt: skip
    """The newest dead letters (ids may be shortened: show, replay and purge take a prefix)."""
    from rich.console import Console
    from rich.table import Table

    r = deployment.redis
    match = deadletter_query.Match(user=user, event=event, message_id=message_id)
    total: int | None = None
    if match:
        entries, next_offset = deadletter_query.newest(
            r, match, reason=reason, since=since, until=until, limit=limit, offset=offset
        )
    else:
        entries = deadletter.list_entries(
            r, reason=reason, since=since, until=until, limit=limit, offset=offset
        )
        total = deadletter.count(r, reason=reason, since=since, until=until)
        next_offset = offset + limit if offset + limit < total else None
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry.as_dict()))
        return
    console = Console()
    # On a narrow terminal the ids are cut to a prefix, which show/replay/purge take.
    short = console.width < 120
    table = Table(show_header=True, header_style="bold")
    table.add_column("id", no_wrap=True)
    for column in ("reason", "status", "attempts", "last failure", "event"):
        table.add_column(column)
    for e in entries:
        body = e.item.get("event")
        what = (
            f"{body.get('type')} {body.get('event') or ''} {body.get('userId') or ''}".strip()
            if isinstance(body, dict) else str(body)[:40]
        )  # fmt: skip
        shown_id = e.id[:ID_PREFIX] if short else e.id
        table.add_row(shown_id, e.reason.value, str(e.status or ""), str(e.attempts),
                      _when(e.last_failure), what)  # fmt: skip
    console.print(table)
    shown = f"{len(entries):,}" if not offset else f"{offset + 1:,}-{offset + len(entries):,}"
    click.echo(f"{shown} of {total:,} shown" if total is not None else f"{shown} shown")
    if next_offset is not None:
        click.echo(f"next page: --offset {next_offset}")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dlq.command("show")
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True, help="The entry as stored (unix times).")
@pass_deployment
def dlq_show(deployment: Deployment, entry_id: str, as_json: bool) -> None:
    """One dead letter, whole: its errors first, times in UTC. ENTRY_ID may be a prefix."""
    [full] = _resolved(deployment, (entry_id,))
    entry = deadletter.get(deployment.redis, full)
    if entry is None or as_json:
        show(entry and entry.as_dict(), f"no dead letter {full}")
        return
    click.echo(json.dumps(readable(entry.as_dict()), indent=2))


def readable(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored entry for reading: why first (errors, reason, ChurnZero's answer), then
    when (UTC), then the event."""
    first = ("errors", "reason", "status", "response", "attempts")
    out = {name: entry[name] for name in first if name in entry}
    for name in ("first_failure", "last_failure"):
        if isinstance(entry.get(name), int | float):
            out[name] = _when(entry[name]) + " UTC"
    return out | {k: v for k, v in entry.items() if k not in out}


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
    """Send dead letters through the normal path again (translation re-runs). IDS may be
    prefixes. Interrupted (Ctrl-C), it says what is left; the same command continues."""
    from rich.progress import Progress

    selection = _select(_resolved(deployment, ids), every, reason, since, until)
    r = deployment.redis
    if dry_run:
        _print_dry_run(deployment, selection, as_json)
        return
    # Replays go to their own lane: a bounded share of the rate while live events flow.
    per_message = deployment.settings.churnzero_batch_size
    total = selection.count(r)
    replayed = 0
    try:
        with Progress(disable=total < 1000) as progress:
            task = progress.add_task("replaying", total=total)
            for page in selection.pages(r):
                replayed += deadletter.replay(r, page, deployment.queue, per_message)
                progress.update(task, advance=len(page))
    except KeyboardInterrupt:
        # A page is queued and removed in one step: what is left is what Redis still holds.
        _interrupted(r, selection, total, "replay", "replayed")
    click.echo(f"replayed {replayed:,} of {total:,}")
    left = _left(r, selection) if selection.ids else 0
    if selection.ids and left:
        click.echo(f"{left:,} could not be replayed (not a relay event): see dlq show", err=True)


def _left(r: Any, selection: deadletter.Selection) -> int:
    """How many of the selected entries are still dead letters."""
    if selection.ids:
        return len(deadletter.get_many(r, list(selection.ids)))
    return selection.count(r)


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
    cli_ops.echo_dry_run(result, "entry", "entry")


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
    """Delete dead letters for good (asks for --yes). IDS may be prefixes."""
    selection = _select(_resolved(deployment, ids), every, reason, since, until)
    r = deployment.redis
    total = selection.count(r)
    if not yes:
        raise click.ClickException(f"this deletes {total:,} dead letters for good; add --yes")
    purged = 0
    try:
        for page in selection.pages(r):
            purged += deadletter.purge(r, page)
    except KeyboardInterrupt:
        _interrupted(r, selection, total, "purge", "purged")
    click.echo(f"purged {purged:,}")


def _interrupted(
    r: Any, selection: deadletter.Selection, total: int, verb: str, done: str
) -> NoReturn:
    """Say what an interrupted replay or purge did and what is left; exit 130 (SIGINT)."""
    left = _left(r, selection)
    click.echo(
        f"\ninterrupted: {total - left:,} of {total:,} {done}, {left:,} left; "
        f"run the same command again to {verb} the rest",
        err=True,
    )
    sys.exit(130)


@dlq.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_REASON
@_SINCE
@_UNTIL
@pass_deployment
def dlq_export(
    deployment: Deployment, file: str, reason: Reason | None, since: float | None,
    until: float | None,
) -> None:  # fmt: skip
    """Write dead letters as JSON Lines to FILE (- for stdout), oldest failure first."""
    r = deployment.redis
    with click.open_file(file, "wb") as out:
        written = deadletter.export(r, out.write, reason=reason, since=since, until=until)
    click.echo(f"exported {written:,}", err=True)
