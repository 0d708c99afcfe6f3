"""`relay preview` and `relay trace`: the operator's look into what the relay would send
and where an event is; and the words both, and `relay dlq replay --dry-run`, print.

Each command calls the same library functions the workers use.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from relay.errors import RequestError
from relay.ops.cli_context import Deployment, pass_deployment
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


@click.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--dlq", "entry_id", default=None, help="Preview a dead letter's replay.")
@click.option(
    "--source", type=click.Choice(["api", "webhook"]), default=None,
    help="Which route the events came by (default: api for a {\"batch\"} wrapper, "
    "webhook otherwise); only `integrations.All: false` depends on it.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_deployment
def preview(
    deployment: Deployment, file: str | None, entry_id: str | None, source: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """The ChurnZero commands a Segment event or batch (FILE, or - / stdin) would
    produce now, with the current mapping and identity map. Nothing is sent."""
    from relay.ops import preview as previewing
    from relay.state import deadletter

    if file is not None and entry_id is not None:
        raise click.UsageError("give FILE or --dlq ID, not both")
    settings = deployment.settings
    mapping = mapping_of(settings)
    r = deployment.redis
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
        except RequestError as exc:
            raise click.ClickException(str(exc)) from None
    verdicts = refused + previewing.preview(r, items, mapping, settings)
    if as_json:
        click.echo(json.dumps([v.as_dict() for v in sorted(verdicts, key=lambda v: v.index)]))
        return
    print_verdicts(verdicts)
    click.echo("(preview: nothing was sent)")


@click.command("trace")
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_deployment
def trace_command(deployment: Deployment, message_id: str, as_json: bool) -> None:
    """Where an event is, by its Segment messageId (or relay id): queued, in flight,
    delayed, dead, delivered or skipped (from the record of recent settlements, else
    from the archive)."""
    from relay.archive import search
    from relay.archive.store import open_store
    from relay.state import trace

    r, store = deployment.redis, open_store(deployment.settings)
    found = trace.find(r, message_id, archived=lambda wanted: search.sightings(store, r, wanted))
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in found]))
        return
    if not found:
        raise click.ClickException(
            f"{message_id} is nowhere: not queued, in flight, delayed or among the newest "
            f"dead letters, and not in the record of the last "
            f"{deployment.settings.trace_size:,} settled events, nor in the archive"
        )
    for sighting in found:
        click.echo(describe(sighting))
        for command in sighting.detail.get("commands", []):
            click.echo("    " + json.dumps(command))


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
    if d.get("archived"):
        tries = len(d.get("tries", []))
        what = f"{sighting.state}{': ' + d['reason'] if d.get('reason') else ''}"
        return (
            f"{what} at {when} ({who}; from the archive), {tries} tr{'y' if tries == 1 else 'ies'}"
            + (", commands sent:" if d.get("commands") else "")
        )
    if sighting.state == "dead":
        gone = "" if d.get("still_dead", True) else " (no longer there: replayed or purged)"
        return f"dead: {d.get('reason')}, entry {d.get('entry')}, since {when}{gone}"
    if sighting.state == "delivered":
        count = len(d.get("commands", []))
        return f"delivered at {when} ({who}), {count} command{'s' * (count != 1)} sent:"
    return f"skipped at {when}: {d.get('reason')} ({who})"


def echo_dry_run(result: Any, name: str, key: str) -> None:
    """Print a dry run's counts by what would happen, then a few examples of each (named
    `name` and their `key`) with their commands and errors."""
    for label, n in result.outcomes.most_common():
        click.echo(f"  {n:>9,}  {words(label)}")
    for label, examples in result.samples.items():
        click.echo(f"\nfor example, {words(label)}:")
        for example in examples:
            click.echo(f"  {name} {example[key]}")
            for command in example["commands"][:5]:
                click.echo("    " + json.dumps(command))
            for error in example["errors"][:3]:
                click.echo(f"    ! {error if isinstance(error, str) else json.dumps(error)}")
    click.echo("\n(dry run: nothing was sent or changed)")
