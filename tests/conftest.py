"""Shared test helpers: Segment fixture files and certificates (processes: tests.procs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "segment"
IN_CI = os.environ.get("CI", "").lower() == "true"

# No RELAY_ variable of the shell that runs the suite may change a verdict: each test sets
# what it needs. RELAY_TEST_* are the suite's own knobs (a given Redis, for one).
for _name in [k for k in os.environ if k.startswith("RELAY_") and not k.startswith("RELAY_TEST_")]:
    del os.environ[_name]


def fixture(name: str) -> Any:
    """A Segment payload from tests/fixtures/segment, as its sender sends it."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing")
    return json.loads(path.read_text())


def make_certs(workdir: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate,
    made with the openssl CLI (the same library redis-server's TLS is built on)."""
    workdir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=relay-test-ca", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (workdir / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=relay-test-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *ext)  # fmt: skip
    return {n: workdir / n for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                     "client.key")}  # fmt: skip
