"""`relay check`: the pre-flight check, run as the operator runs it, against a real Redis,
the real sandbox, and the ways a deployment is not ready."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import make_certs
from tests.integration.conftest import OwnRedis, Sandbox
from tests.procs import Children, free_port, start_sandbox

pytestmark = pytest.mark.integration


def check(cwd: Path, **env: str) -> tuple[int, list[dict[str, Any]], str]:
    """`relay check --json` with only these RELAY_ variables: exit status, findings, stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    command = [sys.executable, "-m", "relay.ops.cli", "check", "--json"]
    env = {**clean, **env}
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.stderr == "", out.stderr  # never a traceback
    report = json.loads(out.stdout)
    assert report["ready"] == (out.returncode == 0)
    return out.returncode, report["findings"], out.stderr


def problems(findings: list[dict[str, Any]]) -> list[str]:
    return [f"{f['part']}: {f['message']}" for f in findings if f["level"] == "problem"]


def ready_env(redis_url: str, sandbox: Sandbox) -> dict[str, str]:
    return {"RELAY_REDIS_URL": redis_url, "RELAY_WRITE_KEYS": "k",
            "RELAY_CHURNZERO_URL": sandbox.url + "/i"}  # fmt: skip


def test_a_ready_deployment_passes_and_changes_nothing_in_churnzero(
    tmp_path: Path, own_redis: OwnRedis, clean_sandbox: Sandbox
) -> None:
    url, _ = own_redis("--appendonly", "yes", "--maxmemory", "100mb",
                       "--maxmemory-policy", "noeviction")  # fmt: skip
    code, findings, _ = check(tmp_path, **ready_env(url, clean_sandbox))
    assert code == 0, findings
    assert [f for f in findings if f["level"] != "ok"] == []
    text = " ".join(f["message"] for f in findings)
    assert "Redis " in text and "answers with its image" in text
    assert clean_sandbox.commands() == []  # the request carried no command
    assert [r["status"] for r in clean_sandbox.requests_log()] == [200]


def test_a_redis_that_may_lose_events_is_a_warning(
    tmp_path: Path, own_redis: OwnRedis, clean_sandbox: Sandbox
) -> None:
    url, _ = own_redis("--maxmemory-policy", "allkeys-lru")
    code, findings, _ = check(tmp_path, **ready_env(url, clean_sandbox))
    assert code == 0
    warnings = " ".join(f["message"] for f in findings if f["level"] == "warning")
    assert "AOF persistence is off" in warnings
    assert "maxmemory-policy is allkeys-lru" in warnings


@contextlib.contextmanager
def https_server(tmp_path: Path) -> Iterator[int]:
    """An https server whose certificate no system CA signed."""
    certs = make_certs(tmp_path / "certs")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.crt"], certs["server.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_each_unready_part_is_one_line_naming_it(
    tmp_path: Path, redis_url: str, clean_sandbox: Sandbox
) -> None:
    base = ready_env(redis_url, clean_sandbox)
    cases: list[tuple[dict[str, str], str]] = [
        ({"RELAY_CHURNZERO_URL": "https://analytics.churnzero.invalid/i",
          "RELAY_CHURNZERO_APP_KEY": "k"}, "analytics.churnzero.invalid does not resolve"),
        ({"RELAY_CHURNZERO_URL": f"http://127.0.0.1:{free_port()}/i"}, "connection refused"),
        ({"RELAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "redis: cannot reach Redis"),
        ({"RELAY_WRITE_KEYS": ""}, "ingest: no RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS"),
        ({"RELAY_CHURNZERO_URL": "https://analytics.churnzero.invalid/i"},
         "app key: RELAY_CHURNZERO_APP_KEY is unset"),
        ({"RELAY_LOG_LEVEL": "verbose"}, "settings: bad configuration: RELAY_LOG_LEVEL"),
    ]  # fmt: skip
    for env, expected in cases:
        code, findings, _ = check(tmp_path, **{**base, **env})
        assert code == 1, (env, findings)
        assert any(expected in line for line in problems(findings)), (env, findings)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, says nothing
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/i"
        slow = {**base, "RELAY_CHURNZERO_URL": url, "RELAY_CHURNZERO_TIMEOUT_S": "1"}
        code, findings, _ = check(tmp_path, **slow)
    assert code == 1
    assert any("no answer within 1 s" in line for line in problems(findings)), findings
    with https_server(tmp_path) as port:
        code, findings, _ = check(tmp_path, **{**base, "RELAY_CHURNZERO_URL":
                                               f"https://127.0.0.1:{port}/i"})  # fmt: skip
    assert code == 1
    assert any("TLS certificate not valid" in line for line in problems(findings)), findings


@pytest.mark.parametrize(
    ("fault", "expected"),
    [({"redirect": 301, "location": "https://eu1analytics.churnzero.net/i"}, "redirect 301 to"),
     ({"html": True}, "not ChurnZero's image"),
     ({"status": 503}, "answered 503")],
)  # fmt: skip
def test_an_answer_that_is_not_churnzeros_image_is_a_problem(
    tmp_path: Path, redis_url: str, clean_sandbox: Sandbox, fault: dict[str, Any], expected: str
) -> None:
    clean_sandbox.fault(**fault)
    code, findings, _ = check(tmp_path, **ready_env(redis_url, clean_sandbox))
    assert code == 1
    assert any(expected in line for line in problems(findings)), findings


def test_a_tenant_that_verifies_identities_needs_the_eiv_secret(
    tmp_path: Path, redis_url: str
) -> None:
    children = Children(tmp_path / "logs")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    try:
        strict = start_sandbox(children, env={**clean, "RELAY_SANDBOX_EIV_SECRET": "s3"})
        assert requests.get(strict.url + "/_sandbox/tenant", timeout=5).json() == {"eiv": True}
        env = ready_env(redis_url, Sandbox(strict.url))
        code, findings, _ = check(tmp_path, **env)
        assert code == 1
        assert any("eiv: the tenant verifies identities" in p for p in problems(findings))
        code, findings, _ = check(tmp_path, **env, RELAY_CHURNZERO_EIV_SECRET="s3")
        assert code == 0, findings
    finally:
        children.stop_all()
