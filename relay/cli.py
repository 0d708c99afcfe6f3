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
from pathlib import Path
from typing import Any

import click

from relay import cli_ops, embedded
from relay.errors import ConfigError, EmbeddedRedisError, IdentityFileError
from relay.settings import Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _redis_url(settings: Settings) -> str:
    try:
        return embedded.resolve_url(settings.redis_url, settings.state_dir)
    except EmbeddedRedisError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.version_option(package_name="churnzero-relay")
def main() -> None:
    """churnzero-relay: Segment events into ChurnZero."""


@main.command()
@click.option(
    "--processes",
    type=click.IntRange(min=0),
    default=None,
    help="Ingest processes on the port. Default: RELAY_INGEST_PROCESSES (0: one per core).",
)
def serve(processes: int | None) -> None:
    """Run the ingest server."""
    from relay import logs, supervise

    settings = _settings()
    try:
        settings.require_ingest_auth()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.configure(settings.log_level, settings.log_format)
    url = _redis_url(settings)
    sys.exit(supervise.serve(settings, url, processes, click.echo))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker of both queues, live and replay (extra arguments go to
    `celery worker`)."""
    from relay import keys

    settings = _settings()
    try:
        settings.require_app_key()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    env = dict(os.environ, RELAY_REDIS_URL=_redis_url(settings))
    command = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-Q", f"{keys.QUEUE},{keys.REPLAY_QUEUE}", "--pool", "threads",
        "-c", str(settings.worker_concurrency),
        "--without-gossip", "--without-mingle", "--loglevel", settings.log_level.upper(),
        *celery_args,
    ]  # fmt: skip
    os.execvpe(sys.executable, command, env)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="Default: RELAY_SANDBOX_PORT.")
@click.option(
    "--eiv-secret",
    envvar="RELAY_SANDBOX_EIV_SECRET",
    default=None,
    help="Strict mode: drop commands without the right EIV hashes, as ChurnZero does.",
)
def sandbox(host: str, port: int | None, eiv_secret: str | None) -> None:
    """Run the ChurnZero sandbox (a stand-in for ChurnZero's /i endpoint)."""
    from relay import sandbox as sandbox_server

    port = port if port is not None else _settings().sandbox_port
    sandbox_server.run(host, port, eiv_secret=eiv_secret or None)


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
            "\"contactExternalId\":\"john.smith@company.com\",\"firstName\":\"John\"}}'\n"
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


def _redis(settings: Settings) -> Any:
    from relay import redis_conn

    return redis_conn.sync_client(settings, _redis_url(settings), socket_timeout=10)


def _status_table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="churnzero-relay", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("events", justify="right")
    depth = data["depth"]
    table.add_row("ready", f"{depth['ready']:,}")
    table.add_row("in flight", f"{depth['in_flight']:,}")
    table.add_row("delayed (retries)", f"{depth['delayed']:,}")
    table.add_row("dead letters", f"{depth['dead']:,}")
    table.add_row("oldest waiting", f"{data['oldest_age_s']:.1f} s")
    table.add_row("ingested /s (1 min)", f"{data['rates']['ingested']['per_s']:,}")
    table.add_row("delivered /s (1 min)", f"{data['rates']['delivered']['per_s']:,}")
    if data["redis_memory_fraction"]:
        table.add_row("Redis memory (of maxmemory)", f"{data['redis_memory_fraction']:.0%}")
    replay = data["replay"]
    if replay["replayed"] or replay["queued_messages"]:
        table.add_row(
            "replay lane",
            f"{replay['delivered']:,} of {replay['replayed']:,} delivered, "
            f"{replay['queued_messages']:,} messages queued",
        )
    if data["learned_rate_rps"] is not None:
        table.add_row("learned rate", f"{data['learned_rate_rps']:,} req/s")
    if data["paused_for_s"]:
        table.add_row("[yellow]ChurnZero paused[/]", f"{data['paused_for_s']:.1f} s")
    if data.get("churnzero_problem"):
        table.add_row("[red]ChurnZero misconfigured[/]", data["churnzero_problem"]["problem"])
    for reason, n in data["dead_letters"].items():
        if n:
            table.add_row(f"  dead: {reason}", f"{n:,}")
    for row in data["names"]["held"]:
        table.add_row(f"[yellow]held new name[/] {row['kind']}", row["name"])
    for row in data["names"]["new"][:10]:
        table.add_row(f"new name {row['kind']}", row["name"])
    return table


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def status(as_json: bool, watch: bool) -> None:
    """Queue depths, rates, oldest age and dead letters of the whole deployment."""
    import json

    from rich.console import Console
    from rich.live import Live

    from relay import status as status_report

    r = _redis(_settings())
    if as_json and not watch:
        click.echo(json.dumps(status_report.report(r)))
        return
    if not watch:
        Console().print(_status_table(status_report.report(r)))
        return
    try:
        with Live(_status_table(status_report.report(r)), refresh_per_second=2) as live:
            while True:
                time.sleep(1)
                data = status_report.report(r)
                if as_json:
                    click.echo(json.dumps(data))
                else:
                    live.update(_status_table(data))
    except KeyboardInterrupt:
        pass


@main.group()
def identities() -> None:
    """Seed and inspect the identity map (userId / anonymousId -> account, contact)."""


@identities.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def identities_import(file: Path) -> None:
    """Seed the map from a CSV or JSON Lines FILE (userId or anonymousId,
    accountExternalId, contactExternalId); waiting tracks of those users go out at once."""
    from relay import identity, identity_file

    try:
        entries = identity_file.read(file)
    except IdentityFileError as exc:
        raise click.ClickException(str(exc)) from None
    settings = _settings()
    released = identity.seed(_redis(settings), entries, settings.identity_ttl_s)
    click.echo(f"imported {len(entries)} identities; released {released} waiting batches")


@identities.command("show")
@click.argument("user_id")
def identities_show(user_id: str) -> None:
    """What the relay knows of USER_ID, as a userId and as an anonymousId (JSON)."""
    import json

    from relay import identity

    known = identity.describe(_redis(_settings()), user_id)
    if not known:
        raise click.ClickException(f"the relay knows nothing of {user_id}")
    click.echo(json.dumps(known, indent=2))


@identities.command("forget")
@click.argument("user_id")
@click.option("--yes", is_flag=True, help="Really forget.")
def identities_forget(user_id: str, yes: bool) -> None:
    """Forget USER_ID as a Segment delete event would (for deletions Segment does not
    forward): queued through the workers, like any event."""
    import uuid
    from datetime import UTC, datetime

    from relay import broker

    if not yes:
        raise click.ClickException("forgetting a user cannot be undone: add --yes")
    settings = _settings()
    r = _redis(settings)
    now = datetime.now(UTC)
    event = {"type": "delete", "userId": user_id, "messageId": f"forget-{uuid.uuid4().hex}",
             "timestamp": now.isoformat().replace("+00:00", "Z")}  # fmt: skip
    item = {"id": uuid.uuid4().hex, "source": "api", "received_at": now.timestamp(),
            "attempts": 0, "event": event}  # fmt: skip
    broker.Queue(r, settings.message_events).publish([item])
    click.echo(f"queued the deletion of {user_id}")


@main.group()
def dlq() -> None:
    """Inspect, replay, purge and export dead letters."""


_REASON = click.option("--reason", default=None, help="Only entries with this reason.")
_SINCE = click.option("--since", type=float, default=None, help="Failed at/after (unix time).")
_UNTIL = click.option("--until", type=float, default=None, help="Failed at/before (unix time).")


def _check_reason(reason: str | None) -> None:
    from relay.deadletter import REASONS

    if reason is not None and reason not in REASONS:
        raise click.BadParameter(f"one of {', '.join(REASONS)}", param_hint="--reason")


@dlq.command("list")
@_REASON
@_SINCE
@_UNTIL
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(
    reason: str | None, since: float | None, until: float | None, limit: int, as_json: bool
) -> None:
    """The newest dead letters."""
    import json
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table

    from relay import deadletter

    _check_reason(reason)
    r = _redis(_settings())
    entries = deadletter.list_entries(r, reason=reason, since=since, until=until, limit=limit)
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry))
        return
    table = Table(show_header=True, header_style="bold")
    for column in ("id", "reason", "status", "attempts", "last failure", "event"):
        table.add_column(column)
    for e in entries:
        event = e["item"].get("event") if isinstance(e["item"], dict) else None
        what = (
            f"{event.get('type')} {event.get('event') or ''} {event.get('userId') or ''}".strip()
            if isinstance(event, dict) else str(event)[:40]
        )  # fmt: skip
        when = datetime.fromtimestamp(e["last_failure"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(e["id"], e["reason"], str(e["status"] or ""), str(e["attempts"]), when, what)
    total = deadletter.count(r, reason=reason, since=since, until=until)
    Console().print(table)
    click.echo(f"{len(entries)} of {total} shown")


@dlq.command("show")
@click.argument("entry_id")
def dlq_show(entry_id: str) -> None:
    """One dead letter, whole, as JSON."""
    import json

    from relay import deadletter

    entry = deadletter.get(_redis(_settings()), entry_id)
    if entry is None:
        raise click.ClickException(f"no dead letter {entry_id}")
    click.echo(json.dumps(entry, indent=2))


def _selected(
    r: Any, ids: tuple[str, ...], every: bool, reason: str | None,
    since: float | None, until: float | None,
) -> tuple[int, Any]:  # fmt: skip
    from relay import deadletter

    _check_reason(reason)
    if ids and (every or reason):
        raise click.UsageError("give ids, or --all / --reason, not both")
    if ids:
        return len(ids), iter([list(ids)])
    if not every and not reason:
        raise click.UsageError("give entry ids, --all or --reason")
    total = deadletter.count(r, reason=reason, since=since, until=until)
    return total, deadletter.iter_ids(r, reason=reason, since=since, until=until)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead letter (with the filters).")
@_REASON
@_SINCE
@_UNTIL
@click.option("--dry-run", is_flag=True, help="Say what a replay would do; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: machine-readable.")
def dlq_replay(
    ids: tuple[str, ...], every: bool, reason: str | None, since: float | None,
    until: float | None, dry_run: bool, as_json: bool,
) -> None:  # fmt: skip
    """Send dead letters through the normal path again (translation re-runs)."""
    from functools import partial

    from rich.progress import Progress

    from relay import broker, deadletter

    settings = _settings()
    r = _redis(settings)
    if dry_run:
        _dry_run(settings, r, ids, every, reason, since, until, as_json)
        return
    # Replays go to their own lane: a bounded share of the rate while live events flow.
    queue = broker.Queue(r, settings.message_events)
    publish = partial(queue.publish, per_message=settings.churnzero_batch_size)

    total, pages = _selected(r, ids, every, reason, since, until)
    replayed = 0
    with Progress(disable=total < 1000) as progress:
        task = progress.add_task("replaying", total=total)
        for page in pages:
            replayed += deadletter.replay(r, page, publish)
            progress.update(task, advance=len(page))
    click.echo(f"replayed {replayed} of {total}")


def _dry_run(
    settings: Settings, r: Any, ids: tuple[str, ...], every: bool, reason: str | None,
    since: float | None, until: float | None, as_json: bool,
) -> None:  # fmt: skip
    _check_reason(reason)
    if ids and (every or reason):
        raise click.UsageError("give ids, or --all / --reason, not both")
    if not ids and not every and not reason:
        raise click.UsageError("give entry ids, --all or --reason")
    selection = {
        "reason": reason,
        "ids": list(ids) if ids else None,
        "since": since,
        "until": until,
    }
    cli_ops.print_dry_run(settings, r, selection, as_json)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True)
@_REASON
@_SINCE
@_UNTIL
@click.option("--yes", is_flag=True, help="Really delete.")
def dlq_purge(
    ids: tuple[str, ...], every: bool, reason: str | None, since: float | None,
    until: float | None, yes: bool,
) -> None:  # fmt: skip
    """Delete dead letters for good (asks for --yes)."""
    from relay import deadletter

    r = _redis(_settings())
    total, pages = _selected(r, ids, every, reason, since, until)
    if not yes:
        raise click.ClickException(f"this deletes {total} dead letters for good; add --yes")
    purged = sum(deadletter.purge(r, page) for page in pages)
    click.echo(f"purged {purged}")


@dlq.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_REASON
def dlq_export(file: str, reason: str | None) -> None:
    """Write dead letters as JSON Lines to FILE (- for stdout)."""
    from relay import deadletter

    _check_reason(reason)
    r = _redis(_settings())
    with click.open_file(file, "wb") as out:
        written = deadletter.export(r, out.write, reason=reason)
    click.echo(f"exported {written}", err=True)


cli_ops.register(main, _settings, _redis)
cli_ops.register_names(main, _settings, _redis)

if __name__ == "__main__":
    main()
