"""`relay archive`: the flight recorder's archiver, and its maintenance on demand.

`relay archive` runs the archiver (relay.archive.archiver) in this process: for operators
who run it as a service of its own; `relay worker` runs one as its child unless
RELAY_ARCHIVE or RELAY_WORKER_ARCHIVER is false. `relay archive compact` runs retention
and compaction once.
"""

from __future__ import annotations

import json
import sys

import click
import redis

from relay.ops.cli_context import Deployment, pass_deployment


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
    """Drop the days older than RELAY_ARCHIVE_DAYS and rewrite the files that still hold
    rows of deleted users without them."""
    import time

    from relay.archive import archiver
    from relay.archive.store import open_store

    store = open_store(deployment.settings)
    dropped = archiver.retain(store, deployment.settings.archive_days, time.time())
    compacted = archiver.compact(store)
    click.echo(json.dumps({"days_dropped": dropped, **compacted}))


def _client(deployment: Deployment) -> redis.Redis:
    from relay.state import redis_conn

    return redis_conn.sync_client(deployment.settings, deployment.running_redis_url)
