"""What the `relay` commands share: the deployment they run or operate, and how an
operational error reaches the operator (one line with a hint, never a traceback).

`relay` puts one `Deployment` on the click context, as rq's CLI does with its
`pass_cli_config`; a command takes it with `@pass_deployment`. The settings are read from
the environment once, on first use, and the Redis URL, client and queue are built from
them once: `relay --help` reads nothing, and a test hands `Deployment(settings)` to
click's runner instead of setting environment variables.

Only the services (`relay dev`, `serve`, `worker`) may start the embedded Redis
(`redis_url`); every other command reads the Redis of a running relay (`redis`), else
stops with exit status 2 (`NoRelayHere`).
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click
import redis

from relay.errors import RelayError
from relay.settings import Settings, load_settings

if TYPE_CHECKING:
    from relay.state import broker

NO_RELAY_HERE = "no relay here: set RELAY_REDIS_URL or run where relay dev runs"


class NoRelayHere(click.ClickException):
    """No RELAY_REDIS_URL and no embedded Redis running here: nothing to operate on."""

    exit_code = 2

    def __init__(self) -> None:
        super().__init__(NO_RELAY_HERE)


class Deployment:
    """The settings of the deployment a command acts on, its Redis and its queue."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self.url_in_use: str | None = None  # the Redis URL a command connected to

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
        """For the services: RELAY_REDIS_URL, or the embedded Redis (started if need be)."""
        from relay.state import embedded

        try:
            self.url_in_use = embedded.resolve_url(self.settings.redis_url, self.settings.state_dir)
        except RelayError as exc:
            raise click.ClickException(str(exc)) from None
        return self.url_in_use

    @cached_property
    def running_redis_url_or_none(self) -> str | None:
        """RELAY_REDIS_URL, or the embedded Redis a relay runs here, or None."""
        from relay.state import embedded

        url = self.settings.redis_url or embedded.running_url(self.settings.state_dir)
        self.url_in_use = url
        return url

    @property
    def running_redis_url(self) -> str:
        """For the operator's commands: RELAY_REDIS_URL, or the embedded Redis a relay
        runs here; never a new one (it would hold nothing and say so)."""
        url = self.running_redis_url_or_none
        if url is None:
            raise NoRelayHere()
        return url

    @cached_property
    def redis(self) -> redis.Redis:
        """A client of the running deployment's Redis, as patient as an operator."""
        from relay.state import redis_conn

        return redis_conn.sync_client(self.settings, self.running_redis_url, socket_timeout=10)

    @cached_property
    def queue(self) -> broker.Queue:
        """The deployment's queue, to publish events to (counted, as ingest does)."""
        from relay.state import broker

        return broker.Queue(self.redis, self.settings.message_events)


pass_deployment = click.make_pass_decorator(Deployment, ensure=True)


class RelayGroup(click.Group):
    """The `relay` group: an operational error ends the command with one line and a hint."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; Redis and relay errors become a one-line ClickException."""
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            deployment = ctx.find_object(Deployment)
            url = deployment.url_in_use if deployment is not None else None
            raise click.ClickException(redis_problem(exc, url)) from None
        except RelayError as exc:
            raise click.ClickException(str(exc)) from None


def redis_problem(exc: redis.RedisError, url: str | None) -> str:
    """One line for an error of Redis: what failed, where, and what to look at."""
    from relay.state.redis_conn import redacted

    where = f" at {redacted(url)}" if url else ""
    detail = str(exc).strip().rstrip(".") or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis{where} refused the credentials ({detail}): check RELAY_REDIS_URL"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (
            f"cannot reach Redis{where} ({detail}): is it running? RELAY_REDIS_URL names it, "
            "e.g. redis://host:6379/0"
        )
    return f"Redis{where} answered an error ({detail})"


def show(found: Any, missing: str) -> None:
    """Print what a `show` command found as indented JSON, or fail with `missing`."""
    if not found:
        raise click.ClickException(missing)
    click.echo(json.dumps(found, indent=2))
