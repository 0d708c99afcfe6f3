"""Starting up: refuse what is unsafe or wrong, with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    clean.update(RELAY_STATE_DIR=str(tmp_path / "state"), **env)
    return subprocess.run([sys.executable, "-m", "relay.ops.cli", *args], env=clean, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_serve_refuses_to_start_unauthenticated(tmp_path: Path) -> None:
    out = run(["serve"], tmp_path, RELAY_REDIS_URL="redis://127.0.0.1:1/0")
    assert out.returncode != 0
    assert "refusing to start: set RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAY_PORT": "eighty"}, "RELAY_PORT"),
        ({"RELAY_CHURNZERO_URL": "ftp://x"}, "RELAY_CHURNZERO_URL: must be an http"),
        ({"RELAY_VISIBILITY_TIMEOUT_S": "20", "RELAY_TASK_TIME_LIMIT_S": "60"},
         "visibility_timeout_s must be at least task_time_limit_s + 15"),
        ({"RELAY_REDIS_URL": "sentinel://127.0.0.1:1"},
         "a sentinel:// RELAY_REDIS_URL needs RELAY_REDIS_MASTER"),
    ],
)  # fmt: skip
def test_bad_configuration_is_one_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    out = run(["status", "--json"], tmp_path, **env)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bad_mapping_file_stops_the_worker_naming_line_and_key(
    tmp_path: Path, redis_url: str
) -> None:
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[traits]\nrename = { plan = "Plan" }\nacount = ["mrr"]\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    clean.update(RELAY_REDIS_URL=redis_url, RELAY_MAPPING_FILE=str(mapping))
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "worker"]
    out = subprocess.run(command, env=clean, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"relay worker: {mapping}: line 3, key traits.acount: Extra inputs are not permitted"
    ]
