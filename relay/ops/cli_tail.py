"""`relay tail`: settlements as they happen, one line per event, until Ctrl-C."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from relay.ops.cli_context import Deployment, pass_deployment
from relay.state import tail


@click.command("tail")
@click.option("--user", default=None, help="Only this user's events (userId, else anonymousId).")
@click.option(
    "--outcome", type=click.Choice(tail.OUTCOMES), default=None, help="Only events that ended so."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_deployment
def tail_command(
    deployment: Deployment, user: str | None, outcome: str | None, as_json: bool
) -> None:
    """Print events as workers settle them (delivered, skipped, dead-lettered), until Ctrl-C."""
    wanted = tail.Filter(user=user, outcome=outcome)
    r = deployment.redis
    shown = 0
    try:
        click.echo("following settlements (Ctrl-C to stop)", err=True)
        for settled in tail.follow(r, wanted):
            shown += 1
            click.echo(json.dumps(settled.as_dict()) if as_json else line(settled))
    except KeyboardInterrupt:
        click.echo(f"\nstopped: {shown:,} event{'s' * (shown != 1)} shown", err=True)


def line(settled: tail.Settled) -> str:
    """One settled event in words: time, outcome, user, event, messageId, and what or why."""
    when = datetime.fromtimestamp(settled.at, UTC).strftime("%H:%M:%S")
    if settled.outcome == "delivered":
        count = len(settled.commands)
        what = f"{count} command{'s' * (count != 1)}"
    elif settled.outcome == "dead":
        what = f"{settled.reason}, entry {settled.entry}"
    else:
        what = settled.reason
    who = settled.user or "-"
    return (
        f"{when}  {settled.outcome:<9}  {who}  {settled.event or '-'}  "
        f"{settled.message_id or settled.relay_id}  ({what})"
    )
