"""`relay`: run the relay and operate it.

Commands read the deployment's settings once (relay.ops.cli_context) and call the same
library functions the services use; each group of operator commands has a module:
`relay dlq` (cli_dlq), `relay identities` (cli_identities), `relay names` (cli_names),
`relay preview` and `relay trace` (cli_ops), `relay tail` (cli_tail), `relay check`
(cli_check), `relay search`, `relay replay` and `relay archive` (cli_archive).
"""

from __future__ import annotations

import signal
import sys
import time

import click

from relay.errors import RelayError
from relay.ops import (
    cli_archive,
    cli_check,
    cli_dlq,
    cli_identities,
    cli_names,
    cli_ops,
    cli_status,
    cli_tail,
)
from relay.ops.cli_context import Deployment, RelayGroup, pass_deployment


@click.group(cls=RelayGroup)
@click.version_option(package_name="churnzero-relay")
@click.pass_context
def main(ctx: click.Context) -> None:
    """churnzero-relay: Segment events into ChurnZero."""
    ctx.ensure_object(Deployment)


@main.command()
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=None,
    help="Ingest processes on the port. Default: RELAY_INGEST_PROCESSES (0: one per core).",
)
# The supervisor's children: their Redis was reached at start; one started again during a
# Redis outage answers 503 like its siblings rather than die and make the supervisor quit.
@click.option("--supervised", is_flag=True, hidden=True)
@pass_deployment
def serve(deployment: Deployment, processes: int | None, supervised: bool) -> None:
    """Run the ingest server."""
    from relay import logs
    from relay.ops import supervise

    settings = deployment.settings
    try:
        settings.require_ingest_auth()
    except RelayError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    url = deployment.redis_url
    if not supervised:
        _reach_redis(deployment)
    sys.exit(supervise.serve(settings, url, processes, click.echo))


def _reach_redis(deployment: Deployment) -> None:
    """Stop a service at start, with one line, when its Redis does not answer: a relay
    that starts without one only answers 503 and delivers nothing."""
    from relay.state import redis_conn

    client = redis_conn.sync_client(deployment.settings, deployment.redis_url, retry=False)
    try:
        client.ping()
    finally:
        client.close()


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_deployment
def worker(deployment: Deployment, celery_args: tuple[str, ...]) -> None:
    """Run the Celery workers: one of the live queue, and one of the replay lane at a
    lower CPU priority while replays are queued (extra arguments go to both `celery
    worker`s; with -Q, one worker of those queues)."""
    from relay.ops import supervise

    settings = deployment.settings
    try:
        settings.require_app_key()
    except RelayError as exc:
        raise click.ClickException(str(exc)) from None
    _reach_redis(deployment)
    sys.exit(supervise.worker(settings, deployment.redis_url, celery_args, click.echo))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="Default: RELAY_SANDBOX_PORT.")
@click.option(
    "--eiv-secret",
    envvar="RELAY_SANDBOX_EIV_SECRET",
    default=None,
    help="Strict mode: drop commands without the right EIV hashes, as ChurnZero does.",
)
@pass_deployment
def sandbox(deployment: Deployment, host: str, port: int | None, eiv_secret: str | None) -> None:
    """Run the ChurnZero sandbox (a stand-in for ChurnZero's /i endpoint)."""
    from relay.dev import sandbox as sandbox_server

    port = port if port is not None else deployment.settings.sandbox_port
    sandbox_server.run(host, port, eiv_secret=eiv_secret or None)


@main.command()
@pass_deployment
def dev(deployment: Deployment) -> None:
    """Everything on one machine: Redis, ingest, a worker and (without an app key) the sandbox."""
    from relay.ops import devstack

    stack = devstack.DevStack(deployment.settings, deployment.redis_url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stack.start()
        if not stack.ready():
            raise click.ClickException("ingest did not start; see the output above")
        click.echo(stack.banner())
        stack.wait()
        raise click.ClickException("a relay process exited; stopping the rest")
    except KeyboardInterrupt:
        click.echo("\nstopping…")
    finally:
        stack.stop()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@pass_deployment
def status(deployment: Deployment, as_json: bool, watch: bool) -> None:
    """Queue depths, rates, oldest age and dead letters of the whole deployment."""
    import json

    from rich.console import Console
    from rich.live import Live

    from relay.delivery.throttle import ADAPT_MAX_RPS
    from relay.state import status as status_report

    r = deployment.redis
    cap = deployment.settings.rate_limit_rps or ADAPT_MAX_RPS
    if as_json and not watch:
        click.echo(json.dumps(status_report.report(r)))
        return
    if not watch:
        Console().print(cli_status.table(status_report.report(r), cap))
        return
    try:
        with Live(cli_status.table(status_report.report(r), cap), refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                data = status_report.report(r)
                if as_json:
                    click.echo(json.dumps(data))
                else:
                    live.update(cli_status.table(data, cap))
    except KeyboardInterrupt:
        pass


for command in (
    cli_dlq.dlq, cli_identities.identities, cli_names.names_group, cli_ops.preview,
    cli_ops.trace_command, cli_tail.tail_command, cli_check.check, cli_archive.search_command,
    cli_archive.replay_command, cli_archive.archive_group,
):  # fmt: skip
    main.add_command(command)

if __name__ == "__main__":
    main()
