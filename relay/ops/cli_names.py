"""`relay names`: the ChurnZero names the relay has created, and the held ones to allow."""

from __future__ import annotations

import json

import click

from relay.ops.cli_context import Deployment, pass_deployment
from relay.reasons import Reason


@click.group("names")
def names_group() -> None:
    """The ChurnZero names (event types, fields) the relay has sent, new and held."""


@names_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_deployment
def names_list(deployment: Deployment, as_json: bool) -> None:
    """How many names are known per kind, the newest new names, the names held."""
    from relay.state import names

    report = names.report(deployment.redis, limit=50)
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
@pass_deployment
def names_allow(deployment: Deployment, name: str, kind: str | None) -> None:
    """Let NAME through the new-name guard; then `relay dlq replay --reason new_name`."""
    from relay.state import names

    allowed = names.allow(deployment.redis, name, kind)
    if not allowed:
        raise click.ClickException(f"{name!r} is not held; give --kind to allow it anyway")
    click.echo(f"allowed {name!r} as {', '.join(allowed)}; now replay: "
               f"relay dlq replay --reason {Reason.NEW_NAME}")  # fmt: skip
