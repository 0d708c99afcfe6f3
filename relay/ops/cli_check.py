"""`relay check`: the pre-flight check (relay.ops.preflight) as the operator runs it."""

from __future__ import annotations

import json
import sys

import click

from relay.ops.cli_context import Deployment, pass_deployment


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_deployment
def check(deployment: Deployment, as_json: bool) -> None:
    """Whether this deployment is ready: settings, Redis, ChurnZero, app key, EIV.
    Exit 0 when ready, 1 with a line per problem."""
    from relay.ops import preflight  # late: it loads the ChurnZero client's modules

    try:
        settings = deployment.settings
    except click.ClickException as exc:
        findings = [preflight.Finding("problem", "settings", exc.message)]
    else:
        findings = preflight.run(settings, deployment.running_redis_url_or_none)
    if as_json:
        ok = preflight.ready(findings)
        click.echo(json.dumps({"ready": ok, "findings": [f.as_dict() for f in findings]}))
    else:
        for f in findings:
            click.echo(f"{f.level:<8} {f.part}: {f.message}")
    if not preflight.ready(findings):
        sys.exit(1)
