"""`relay`: run the relay and operate it.

Each command builds `Settings` from the environment and calls the same library
functions the services use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from typing import Any

import click

from relay import embedded
from relay.settings import ConfigError, Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _redis_url(settings: Settings) -> str:
    try:
        return embedded.resolve_url(settings.redis_url, settings.state_dir)
    except embedded.EmbeddedRedisError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="churnzero-relay")
def main() -> None:
    """churnzero-relay: Segment events into ChurnZero."""


@main.command()
def serve() -> None:
    """Run the ingest server."""
    import asyncio

    from relay import ingest, logs

    settings = _settings()
    try:
        settings.require_ingest_auth()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    url = _redis_url(settings)
    asyncio.run(
        ingest.serve(
            settings,
            url,
            ready=lambda: click.echo(f"relay ingest on http://{settings.host}:{settings.port}"),
        )
    )


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    settings = _settings()
    env = dict(os.environ, RELAY_REDIS_URL=_redis_url(settings))
    command = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-Q", "relay", "--pool", "threads", "-c", str(settings.worker_concurrency),
        "--without-gossip", "--without-mingle", "--loglevel", settings.log_level.upper(),
        *celery_args,
    ]  # fmt: skip
    os.execvpe(sys.executable, command, env)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="Default: RELAY_SANDBOX_PORT.")
def sandbox(host: str, port: int | None) -> None:
    """Run the ChurnZero sandbox (a stand-in for ChurnZero's /i endpoint)."""
    from relay import sandbox as sandbox_server

    sandbox_server.run(host, port if port is not None else _settings().sandbox_port)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", *args], env=env, start_new_session=True
    )


def _wait_http(url: str, timeout_s: float = 20) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@main.command()
def dev() -> None:
    """Everything on one machine: Redis, ingest, a worker and (without an app key) the sandbox."""
    settings = _settings()
    redis_url = _redis_url(settings)
    env = dict(os.environ, RELAY_REDIS_URL=redis_url)
    children: list[subprocess.Popen[bytes]] = []
    notes = []
    if settings.uses_sandbox:
        port = settings.sandbox_port
        children.append(_spawn(["sandbox", "--port", str(port)], env))
        env["RELAY_CHURNZERO_URL"] = f"http://127.0.0.1:{port}/i"
        env["RELAY_CHURNZERO_APP_KEY"] = "relay-dev-sandbox"
        notes.append(f"ChurnZero sandbox  http://127.0.0.1:{port}/_sandbox/commands")
    if not settings.authenticated:
        env["RELAY_ALLOW_UNAUTHENTICATED"] = "true"
        notes.append("authentication is OFF (set RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS)")
    children.append(_spawn(["serve"], env))
    children.append(_spawn(["worker"], env))

    def stop(*_: Any) -> None:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        embedded.stop()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    base = f"http://{settings.host}:{settings.port}"
    try:
        if not _wait_http(base + "/livez"):
            raise click.ClickException("ingest did not start; see the output above")
        where = "embedded " + redis_url if not settings.redis_url else redis_url
        click.echo(
            "\nchurnzero-relay is running\n"
            f"  ingest             {base}/webhook  and  {base}/v1/batch\n"
            f"  metrics            {base}/metrics\n"
            f"  redis              {where}\n" + "".join(f"  {n}\n" for n in notes) + "\n"
            "Try it:\n"
            f"  curl -s {base}/v1/identify -H 'Content-Type: application/json' -d "
            "'{\"userId\":\"userId123\",\"traits\":{\"accountExternalId\":\"12345678\","
            "\"contactExternalId\":\"john.smith@company.com\",\"name\":\"John\"}}'\n"
            f"  curl -s {base}/v1/track -H 'Content-Type: application/json' -d "
            "'{\"userId\":\"userId123\",\"event\":\"Clicked Login Button\"}'\n"
            + (f"  curl -s http://127.0.0.1:{settings.sandbox_port}/_sandbox/commands\n"
               if settings.uses_sandbox else "")
            + "\nCtrl-C stops everything.\n"
        )  # fmt: skip
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        raise click.ClickException("a relay process exited; stopping the rest")
    except KeyboardInterrupt:
        click.echo("\nstopping…")
    finally:
        stop()


if __name__ == "__main__":
    main()

