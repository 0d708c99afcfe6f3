"""`relay identities`: seed, inspect and forget the identity map."""

from __future__ import annotations

from pathlib import Path

import click

from relay.errors import RelayError
from relay.ops.cli_context import Deployment, pass_deployment, show


@click.group()
def identities() -> None:
    """Seed and inspect the identity map (userId / anonymousId -> account, contact)."""


@identities.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_deployment
def identities_import(deployment: Deployment, file: Path) -> None:
    """Seed the map from a CSV or JSON Lines FILE (userId or anonymousId,
    accountExternalId, contactExternalId); waiting tracks of those users go out at once."""
    from relay.ops import identity_file
    from relay.state import identity

    try:
        entries = identity_file.read(file)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from None
    ttl_s = deployment.settings.identity_ttl_s
    released = identity.seed(deployment.redis, entries, ttl_s)
    click.echo(f"imported {len(entries)} identities; released {released} waiting batches")


@identities.command("show")
@click.argument("user_id")
@pass_deployment
def identities_show(deployment: Deployment, user_id: str) -> None:
    """What the relay knows of USER_ID, as a userId and as an anonymousId (JSON)."""
    from relay.state import identity

    show(identity.describe(deployment.redis, user_id), f"the relay knows nothing of {user_id}")


@identities.command("forget")
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="Really forget.")
@pass_deployment
def identities_forget(deployment: Deployment, user_id: str, yes: bool) -> None:
    """Forget USER_ID as a Segment delete event would (for deletions Segment does not
    forward): queued through the workers, like any event."""
    import uuid
    from datetime import UTC, datetime

    from relay import clock
    from relay.envelope import Envelope

    if not yes:
        raise click.ClickException("forgetting a user cannot be undone: add --yes")
    now = datetime.now(UTC)
    event = {"type": "delete", "userId": user_id, "messageId": f"forget-{uuid.uuid4().hex}",
             "timestamp": clock.iso(now)}  # fmt: skip
    item = Envelope.new(event, source="operator", received_at=now.timestamp())
    deployment.queue.publish([item.to_dict()])
    click.echo(f"queued the deletion of {user_id}")
