"""The `relay` CLI never lies and never dumps a traceback: the real command, run as an
operator runs it, from a directory of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import Children, free_port, start_ingest

pytestmark = pytest.mark.integration

NO_RELAY_HERE = "no relay here: set RELAY_REDIS_URL or run where relay dev runs"

READ_ONLY = [
    ["status"], ["status", "--json"], ["dlq", "list"], ["dlq", "show", "x"], ["trace", "x"],
    ["identities", "show", "u"], ["names", "list"], ["tail"], ["tail", "--json"],
]  # fmt: skip


def relay_command(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`relay ARGS` from `cwd` with only these RELAY_ variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    command = [sys.executable, "-m", "relay.ops.cli", *args]
    env = {**clean, **env}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line of stderr (a traceback would be many)."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_read_only_commands_never_start_a_redis_of_their_own(
    tmp_path: Path, args: list[str]
) -> None:
    out = relay_command(args, tmp_path)
    assert out.returncode == 2
    assert one_line(out) == f"Error: {NO_RELAY_HERE}"
    assert list(tmp_path.iterdir()) == []  # no ./.relay, no embedded Redis started


@pytest.mark.parametrize("args", [["status"], ["dlq", "list"], ["serve"], ["worker"]], ids=" ".join)
@pytest.mark.parametrize("url", ["redis://127.0.0.1:{port}/0", "redis://:pw@127.0.0.1:{port}/0"])
def test_redis_down_is_one_line_with_a_hint(tmp_path: Path, args: list[str], url: str) -> None:
    out = relay_command(args, tmp_path, RELAY_REDIS_URL=url.format(port=free_port()),
                RELAY_WRITE_KEYS="k", RELAY_CHURNZERO_APP_KEY="k")  # fmt: skip
    assert out.returncode == 1
    line = one_line(out)
    assert line.startswith("Error: cannot reach Redis at redis://")
    assert "is it running? RELAY_REDIS_URL names it" in line
    assert "pw" not in line


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAY_REDIS_URL": "localhost:6379"}, "RELAY_REDIS_URL: 'localhost:6379' is not a"),
        ({"RELAY_LOG_LEVEL": "verbose"}, "RELAY_LOG_LEVEL: must be one of"),
        ({"RELAY_CORS_ORIGINS": "example.com"}, "RELAY_CORS_ORIGINS: 'example.com' is not an"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("args", [["status"], ["dlq", "list"], ["serve"]], ids=" ".join)
def test_a_bad_setting_stops_every_command(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    out = relay_command(args, tmp_path, RELAY_WRITE_KEYS="k", **env)
    assert out.returncode == 1
    assert message in one_line(out)


def test_status_reads_the_relay_that_runs_here(tmp_path: Path) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    children = Children(tmp_path / "logs")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env = {**clean, "RELAY_STATE_DIR": str(site / ".relay"), "RELAY_WRITE_KEYS": "k",
           "RELAY_INGEST_PROCESSES": "1", "RELAY_LOG_FORMAT": "json"}  # fmt: skip
    try:
        start_ingest(children, env)  # `relay serve` owns the embedded Redis under site/
        out = relay_command(["status", "--json"], site)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["depth"]["dead"] == 0
        assert relay_command(["dlq", "list"], site).returncode == 0
        assert relay_command(["status"], elsewhere).returncode == 2
    finally:
        children.stop_all()
