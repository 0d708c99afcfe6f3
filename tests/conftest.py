"""Shared test helpers: Segment fixture files and certificates (processes: tests.procs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.procs import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "segment"
IN_CI = os.environ.get("CI", "").lower() == "true"

# No RELAY_ variable of the shell that runs the suite may change a verdict: each test sets
# what it needs. RELAY_TEST_* are the suite's own knobs (a given Redis, for one).
for _name in [k for k in os.environ if k.startswith("RELAY_") and not k.startswith("RELAY_TEST_")]:
    del os.environ[_name]

# Hypothesis profiles: `ci` (CI=true) runs every property test in full, derandomized as
# Hypothesis's own CI profile is; `dev`, the default, runs a few examples of each, so that
# `make unit` stays a fast inner loop. `pytest --hypothesis-profile=ci` runs the full one
# anywhere. A test that names its own count of examples takes it through `examples`.
settings.register_profile("ci", settings.get_profile("ci"), max_examples=120)
settings.register_profile("dev", max_examples=15)
settings.load_profile("ci" if IN_CI else "dev")


def examples(full: int) -> int:
    """Examples for a property test that names its own count: all of them under the ci
    profile, a tenth (at least 15) under any other."""
    return full if settings.get_current_profile_name() == "ci" else max(full // 10, 15)


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
