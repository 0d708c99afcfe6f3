"""What the `relay` commands share: the deployment they run or operate.

`relay` puts one `Deployment` on the click context, as rq's CLI does with its
`pass_cli_config`; a command takes it with `@pass_deployment`. The settings are read from
the environment once, on first use, and the Redis URL, client and queue are built from
them once: `relay --help` reads nothing, and a test hands `Deployment(settings)` to
click's runner instead of setting environment variables.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click

from relay.errors import RelayError
from relay.settings import Settings, load_settings

if TYPE_CHECKING:
    import redis

    from relay.state import broker


class Deployment:
    """The settings of the deployment a command acts on, its Redis and its queue."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> Settings:
        """The settings given, or those of the environment (read once)."""
        if self._settings is None:
            try:
                self._settings = load_settings()
            except RelayError as exc:
                raise click.ClickException(str(exc)) from None
        return self._settings

    @cached_property
    def redis_url(self) -> str:
        """RELAY_REDIS_URL, or the embedded Redis (started if need be)."""
        from relay.state import embedded

        try:
            return embedded.resolve_url(self.settings.redis_url, self.settings.state_dir)
        except RelayError as exc:
            raise click.ClickException(str(exc)) from None

    @cached_property
    def redis(self) -> redis.Redis:
        """A client of the deployment's Redis, as patient as an operator."""
        from relay.state import redis_conn

        return redis_conn.sync_client(self.settings, self.redis_url, socket_timeout=10)

    @cached_property
    def queue(self) -> broker.Queue:
        """The deployment's queue, to publish events to (counted, as ingest does)."""
        from relay.state import broker

        return broker.Queue(self.redis, self.settings.message_events)


pass_deployment = click.make_pass_decorator(Deployment, ensure=True)


def show(found: Any, missing: str) -> None:
    """Print what a `show` command found as indented JSON, or fail with `missing`."""
    if not found:
        raise click.ClickException(missing)
    click.echo(json.dumps(found, indent=2))
