"""`relay dev` (what `make run` starts): the newcomer's first experience, end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.procs import ROOT, free_port

pytestmark = pytest.mark.integration


def test_relay_dev_runs_everything_and_stops_cleanly(tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_PORT=str(port), RELAY_SANDBOX_PORT=str(sandbox_port),
               RELAY_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")  # fmt: skip
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115  # the child's output
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.ops.cli", "dev"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    family: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 40
        while "Ctrl-C stops everything" not in (tmp_path / "dev.log").read_text(errors="ignore"):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "dev.log"
            ).read_text(errors="ignore")
            time.sleep(0.2)
        output = (tmp_path / "dev.log").read_text(errors="ignore")
        assert "authentication is OFF" in output and f"{base}/webhook" in output
        # The curl lines it prints, as a newcomer would paste them.
        requests.post(base + "/v1/identify", json={"userId": "userId123", "traits": {
            "accountExternalId": "12345678", "contactExternalId": "john.smith@company.com",
            "firstName": "John"}}).raise_for_status()  # fmt: skip
        requests.post(base + "/v1/track", json={"userId": "userId123",
                      "event": "Clicked Login Button"}).raise_for_status()  # fmt: skip
        sandbox = f"http://127.0.0.1:{sandbox_port}/_sandbox/commands"
        deadline = time.monotonic() + 20
        while len(commands := requests.get(sandbox).json()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [c["action"] for c in commands] == ["setAttribute", "trackEvent"]
        assert commands[1]["eventName"] == "Clicked Login Button"
        assert (tmp_path / "state" / "appendonly.aof").exists() or any(
            (tmp_path / "state").glob("appendonly*")
        )  # the embedded Redis keeps an append-only file
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 4  # redis-server, sandbox, ingest, worker
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        proc.wait(30)
        _gone, alive = psutil.wait_procs(family, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in family:
            if p.is_running():
                p.kill()


def test_the_banner_lines_work_as_pasted_with_credentials_set(tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_PORT=str(port), RELAY_SANDBOX_PORT=str(sandbox_port),
               RELAY_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1",
               RELAY_WRITE_KEYS="dev-key", RELAY_WEBHOOK_SECRET="dev-secret")  # fmt: skip
    log = open(tmp_path / "dev.log", "wb")  # noqa: SIM115  # the child's output
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.ops.cli", "dev"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while "Ctrl-C stops everything" not in (output := (tmp_path / "dev.log").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, output
            time.sleep(0.2)
        curls = [line.strip() for line in output.splitlines() if line.strip().startswith("curl")]
        posts = [c for c in curls if "/_sandbox/" not in c]
        assert len(posts) == 3 and "X-Signature: " in posts[2], output
        for line in posts:  # pasted into a shell, as a newcomer would
            answer = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=20)
            assert '"success": true' in answer.stdout.replace('":true', '": true'), (line, answer)
        sandbox = f"http://127.0.0.1:{sandbox_port}/_sandbox/commands"
        deadline = time.monotonic() + 20
        while len(events := [c for c in requests.get(sandbox).json()
                             if c["action"] == "trackEvent"]) < 2:  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert {e["eventName"] for e in events} == {
            "Clicked Login Button",
            "Opened Webhook Example",
        }
        admin = next(line for line in output.splitlines() if line.strip().startswith("admin"))
        url, token = admin.split()[1], admin.split()[3]
        status = requests.get(url + "api/status", headers={"Authorization": f"Bearer {token}"})
        assert status.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
