"""`relay preview`, `relay trace` and `relay names`: the operator's look into what the
relay would send, where an event is, and which ChurnZero names it has created.

Registered on the `relay` group by relay.cli; each command calls the same library
functions the workers use.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from relay.settings import Settings

_OUTCOME_WORDS = {
    "deliver": "would deliver",
    "skip": "would skip",
    "wait": "would wait",
    "dead": "would dead-letter",
}


def mapping_of(settings: Settings) -> Any:
    """The mapping the workers use (RELAY_MAPPING_FILE, or the defaults)."""
    from relay.errors import MappingError
    from relay.mapping import load_mapping

    try:
        return load_mapping(settings.mapping_file)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from None


def words(label: str) -> str:
    """An outcome label (`skip: unsupported_type`) as the CLI prints it."""
    outcome, _, reason = label.partition(": ")
    if label == "wait: identity_wait":
        return "still unresolved (waits for an identify)"
    text = _OUTCOME_WORDS.get(outcome, outcome)
    return f"{text} ({reason})" if reason else text


def print_verdicts(verdicts: list[Any]) -> None:
    """One block per event: where it was, what would become of it, its commands."""
    for v in sorted(verdicts, key=lambda v: v.index):
        count = f", {len(v.commands)} command{'s' * (len(v.commands) != 1)}" if v.commands else ""
        who = " ".join(part for part in (f"#{v.index}", v.type, v.user) if part)
        click.echo(f"{who}: {words(v.label)}{count}")
        for error in v.errors:
            click.echo(f"    ! {error if isinstance(error, str) else json.dumps(error)}")
        for command in v.commands:
            click.echo("    " + json.dumps(command))


def print_dry_run(settings: Settings, r: Any, selection: Any, as_json: bool) -> None:
    """`relay dlq replay --dry-run`: what a replay of the selected entries would do now."""
    from relay import preview

    pages = preview.entries_pages(
        r, reason=selection.reason, ids=list(selection.ids) or None,
        since=selection.since, until=selection.until,
    )  # fmt: skip
    result = preview.dry_run(r, pages, mapping_of(settings), settings)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(f"dry run: a replay of {result.total:,} dead letters now would")
    for label, n in result.outcomes.most_common():
        click.echo(f"  {n:>9,}  {words(label)}")
    for label, examples in result.samples.items():
        click.echo(f"\nfor example, {words(label)}:")
        for example in examples:
            click.echo(f"  entry {example['entry']}")
            for command in example["commands"][:5]:
                click.echo("    " + json.dumps(command))
            for error in example["errors"][:3]:
                click.echo(f"    ! {error if isinstance(error, str) else json.dumps(error)}")
    click.echo("\n(dry run: nothing was sent or changed)")


def register(main: click.Group, settings_of: Any, redis_of: Any) -> None:
    """Add the commands to the `relay` group (settings and Redis built as relay.cli does)."""

    @main.command()
    @click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
    @click.option("--dlq", "entry_id", default=None, help="Preview a dead letter's replay.")
    @click.option(
        "--source", type=click.Choice(["api", "webhook"]), default=None,
        help="Which route the events came by (default: api for a {\"batch\"} envelope, "
        "webhook otherwise); only `integrations.All: false` depends on it.",
    )  # fmt: skip
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def preview(file: str | None, entry_id: str | None, source: str | None, as_json: bool) -> None:
        """The ChurnZero commands a Segment event or batch (FILE, or - / stdin) would
        produce now, with the current mapping and identity map. Nothing is sent."""
        from relay import deadletter, intake
        from relay import preview as previewing

        if file is not None and entry_id is not None:
            raise click.UsageError("give FILE or --dlq ID, not both")
        settings = settings_of()
        mapping = mapping_of(settings)
        r = redis_of(settings)
        if entry_id is not None:
            entry = deadletter.get(r, entry_id)
            if entry is None:
                raise click.ClickException(f"no dead letter {entry_id}")
            items, refused = [deadletter.replay_item(entry, time.time())], list[Any]()
        else:
            with click.open_file(file or "-", "rb") as handle:
                body = handle.read()
            try:
                items, refused = previewing.items_of(body, source)
            except intake.BadRequest as exc:
                raise click.ClickException(str(exc)) from None
        verdicts = refused + previewing.preview(r, items, mapping, settings)
        if as_json:
            click.echo(json.dumps([v.as_dict() for v in sorted(verdicts, key=lambda v: v.index)]))
            return
        print_verdicts(verdicts)
        click.echo("(preview: nothing was sent)")

    @main.command("trace")
    @click.argument("message_id")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def trace_command(message_id: str, as_json: bool) -> None:
        """Where an event is, by its Segment messageId (or relay id): queued, in flight,
        delayed, dead, delivered or skipped (from the record of recent settlements)."""
        from relay import trace

        settings = settings_of()
        found = trace.find(redis_of(settings), message_id)
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in found]))
            return
        if not found:
            raise click.ClickException(
                f"{message_id} is nowhere: not queued, in flight, delayed or among the newest "
                f"dead letters, and not in the record of the last {settings.trace_size:,} "
                "settled events"
            )
        for sighting in found:
            click.echo(describe(sighting))
            for command in sighting.detail.get("commands", []):
                click.echo("    " + json.dumps(command))


def register_names(main: click.Group, settings_of: Any, redis_of: Any) -> None:
    """Add `relay names list` and `relay names allow` to the `relay` group."""

    @main.group("names")
    def names_group() -> None:
        """The ChurnZero names (event types, fields) the relay has sent, new and held."""

    @names_group.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def names_list(as_json: bool) -> None:
        """How many names are known per kind, the newest new names, the names held."""
        from relay import names

        report = names.report(redis_of(settings_of()), limit=50)
        if as_json:
            click.echo(json.dumps(report))
            return
        known = ", ".join(f"{n:,} {kind.replace('_', ' ')}s" for kind, n in report["known"].items())
        click.echo(f"known: {known}")
        for title, rows in (("held (RELAY_NEW_NAMES=hold)", report["held"]),
                            ("newest new names", report["new"])):  # fmt: skip
            click.echo(f"{title}: {'none' if not rows else ''}")
            for row in rows:
                click.echo(f"  {row['kind']:<18} {row['name']}")

    @names_group.command("allow")
    @click.argument("name")
    @click.option(
        "--kind", type=click.Choice(["event", "account_attribute", "contact_attribute"]),
        default=None, help="Default: every kind NAME is held in.",
    )  # fmt: skip
    def names_allow(name: str, kind: str | None) -> None:
        """Let NAME through the new-name guard; then `relay dlq replay --reason new_name`."""
        from relay import names

        allowed = names.allow(redis_of(settings_of()), name, kind)
        if not allowed:
            raise click.ClickException(f"{name!r} is not held; give --kind to allow it anyway")
        click.echo(f"allowed {name!r} as {', '.join(allowed)}; now replay: "
                   "relay dlq replay --reason new_name")  # fmt: skip


def describe(sighting: Any) -> str:
    """One line saying where the event is and what that place knows."""
    from datetime import UTC, datetime

    d = sighting.detail
    when = (
        datetime.fromtimestamp(sighting.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if sighting.at is not None else ""
    )  # fmt: skip
    who = f"relay id {d.get('relay_id')}"
    if sighting.state == "queued":
        return f"queued in {d.get('queue')} ({who}, {d.get('attempts', 0)} attempts so far)"
    if sighting.state == "in_flight":
        return f"in flight: a worker is delivering it ({who})"
    if sighting.state == "delayed":
        return (
            f"delayed: next attempt at {when}, cause {d.get('cause') or 'unknown'}, "
            f"{d.get('attempts', 0)} attempts so far ({who})"
        )
    if sighting.state == "dead":
        gone = "" if d.get("still_dead", True) else " (no longer there: replayed or purged)"
        return f"dead: {d.get('reason')}, entry {d.get('entry')}, since {when}{gone}"
    if sighting.state == "delivered":
        count = len(d.get("commands", []))
        return f"delivered at {when} ({who}), {count} command{'s' * (count != 1)} sent:"
    return f"skipped at {when}: {d.get('reason')} ({who})"
