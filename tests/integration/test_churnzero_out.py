"""What goes to ChurnZero, and when it must not count as delivered: redirects and
pages that are not ChurnZero's pixel pause delivery and keep the events; a worker
without an app key, or on plain http, refuses to start; EIV hashes against a strict
sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from relay.state import status
from tests import procs
from tests.integration.conftest import WRITE_KEY, Sandbox, Starter, relay_env
from tests.procs import ROOT, Proc

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


def stats(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall("relay:stats").items()}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def post_tracks(ingest: str, count: int) -> None:
    batch = [
        {"type": "track", "userId": f"u{n}", "event": "Logged In",
         "properties": {"accountExternalId": "acct", "contactExternalId": f"c{n}"}}
        for n in range(count)
    ]  # fmt: skip
    requests.post(ingest + "/v1/batch", json={"batch": batch}, auth=AUTH).raise_for_status()


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"redirect": 301}, id="301"),
        pytest.param({"redirect": 302}, id="302"),
        pytest.param({"redirect": 307}, id="307"),
        pytest.param({"html": True}, id="html-200"),
    ],
)
def test_misconfigured_churnzero_url_delivers_nothing_as_delivered_and_keeps_events(
    r: redis.Redis,
    clean_sandbox: Sandbox,
    relay_with: Callable[..., str],
    fault: dict[str, Any],
) -> None:
    # The four faults share a worker and ingest (see SharedRelay).
    ingest = relay_with(churnzero_misconfigured_pause_s=1)
    if "redirect" in fault:
        # Back to the sandbox itself: a client that follows it would "deliver" a bodyless GET.
        fault = {**fault, "location": clean_sandbox.url + "/i"}
    clean_sandbox.fault(**fault)
    post_tracks(ingest, 5)
    wait_for(
        lambda: stats(r).get("requests:misconfigured", 0) >= 2, "repeated misconfigured answers"
    )
    seen = stats(r)
    assert seen.get("delivered", 0) == 0
    assert seen.get("retried:misconfigured", 0) >= 5
    assert clean_sandbox.commands() == []
    log = clean_sandbox.requests_log()
    assert {e["method"] for e in log} == {"POST"}  # never followed with a GET
    problem = status.report(r)["churnzero_problem"]
    assert problem is not None
    assert ("redirect" in problem["problem"]) == ("redirect" in fault)
    assert r.zcard("relay:dlq:index") == 0  # kept for retry, not dead-lettered
    # Once the URL answers like ChurnZero again, the kept events arrive, each once.
    clean_sandbox.reset()
    commands = clean_sandbox.wait_commands(5, timeout=30)
    assert sorted(c["contactExternalId"] for c in commands) == [f"c{n}" for n in range(5)]
    wait_for(lambda: stats(r).get("delivered", 0) == 5, "5 delivered")


def test_status_and_metrics_show_the_misconfiguration(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    clean_sandbox.fault(redirect=301, location="https://elsewhere.example/i")
    start_worker(churnzero_misconfigured_pause_s=30)
    ingest = start_ingest(admin_token="t0k")
    post_tracks(ingest, 1)
    wait_for(lambda: status.churnzero_problem(r) is not None, "the problem in status")
    report = requests.get(ingest + "/admin/api/status", headers={"Authorization": "Bearer t0k"},
                          timeout=5).json()  # fmt: skip
    assert report["paused_for_s"] > 5  # every worker holds back
    assert "https://elsewhere.example/i" in report["churnzero_problem"]["problem"]
    metrics = requests.get(ingest + "/metrics", timeout=5).text
    assert 'relay_churnzero_requests_total{outcome="misconfigured"} 1.0' in metrics
    assert "relay_churnzero_paused 1.0" in metrics
    out = subprocess.run(
        [sys.executable, "-m", "relay.ops.cli", "status"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "RELAY_REDIS_URL": url_of(r)}, timeout=30,
    )  # fmt: skip
    assert "ChurnZero misconfigured" in out.stdout, out.stdout + out.stderr


def url_of(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


# --- refusing to start ------------------------------------------------------------------


def run_worker(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    clean.update(RELAY_STATE_DIR=str(tmp_path / "state"), **env)
    return subprocess.run([sys.executable, "-m", *args], env=clean, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


WORKERS = [
    pytest.param(["relay.ops.cli", "worker"], id="relay-worker"),
    pytest.param(["celery", "-A", "workers.app", "worker", "-Q", "relay"], id="celery-worker"),
]


@pytest.mark.parametrize("command", WORKERS)
def test_worker_without_app_key_refuses_to_start_in_one_line(
    command: list[str], tmp_path: Path, redis_url: str
) -> None:
    out = run_worker(command, tmp_path, RELAY_REDIS_URL=redis_url)
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "refusing to start: set RELAY_CHURNZERO_APP_KEY" in line


@pytest.mark.parametrize("command", WORKERS)
def test_worker_on_plain_http_refuses_to_start_in_one_line(
    command: list[str], tmp_path: Path, redis_url: str
) -> None:
    out = run_worker(command, tmp_path, RELAY_REDIS_URL=redis_url,
                     RELAY_CHURNZERO_APP_KEY="k",
                     RELAY_CHURNZERO_URL="http://analytics.churnzero.net/i")  # fmt: skip
    assert out.returncode != 0
    [line] = out.stderr.strip().splitlines()
    assert "RELAY_CHURNZERO_URL must be https://" in line


def test_worker_pointed_at_the_sandbox_needs_no_app_key(
    r: redis.Redis,
    redis_url: str,
    clean_sandbox: Sandbox,
    start_ingest: Callable[..., str],
    tmp_path: Path,
) -> None:
    env = relay_env(redis_url, churnzero_url=clean_sandbox.url + "/i")
    del env["RELAY_CHURNZERO_APP_KEY"]
    args = [sys.executable, "-m", "relay.ops.cli", "worker", "-c", "1", "--without-heartbeat",
            "-n", f"nokey-{os.getpid()}@%h"]  # fmt: skip
    worker = Proc(args, env, tmp_path / "worker.log").start()
    try:
        ingest = start_ingest()
        post_tracks(ingest, 1)
        commands = clean_sandbox.wait_commands(1)
        assert [c["contactExternalId"] for c in commands] == ["c0"], worker.tail()
    finally:
        worker.stop()


# --- Enhanced Identity Verification -----------------------------------------------------


@pytest.fixture
def strict_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox in strict mode: commands without the right EIV hashes are dropped."""
    env = {**os.environ, "RELAY_SANDBOX_EIV_SECRET": "tenant-eiv-secret"}
    children = procs.Children(tmp_path)
    try:
        yield Sandbox(procs.start_sandbox(children, "strict-sandbox", env).url)
    finally:
        children.stop_all()


def sandbox_stats(sandbox: Sandbox) -> dict[str, Any]:
    return dict(requests.get(sandbox.url + "/_sandbox/stats", timeout=5).json())


@pytest.mark.parametrize("secret", ["tenant-eiv-secret", None, "a-wrong-secret"])
def test_eiv_hashes_decide_what_a_strict_tenant_keeps(
    r: redis.Redis,
    strict_sandbox: Sandbox,
    start_ingest: Callable[..., str],
    start_worker: Starter,
    secret: str | None,
) -> None:
    settings: dict[str, Any] = {"churnzero_url": strict_sandbox.url + "/i"}
    if secret is not None:
        settings["churnzero_eiv_secret"] = secret
    start_worker(**settings)
    ingest = start_ingest()
    post_tracks(ingest, 3)
    wait_for(lambda: stats(r).get("delivered", 0) == 3, "3 answered 200")
    seen = sandbox_stats(strict_sandbox)
    if secret == "tenant-eiv-secret":
        assert (seen["commands"], seen["unverified"]) == (3, 0)
        for command in strict_sandbox.commands():
            assert len(command["accountExternalIdHash"]) == 64
    else:
        # ChurnZero answers 200 and keeps nothing: the difference EIV makes.
        assert (seen["commands"], seen["unverified"]) == (0, 3)
