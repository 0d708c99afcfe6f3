"""wrk, the HTTP load generator of the ingest benchmarks: installed if missing, driven by
a generated Lua script (method, body, headers) whose `done` hook prints the figures as
JSON, so nothing is scraped from wrk's human-readable report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

from tests.bench.harness import say

# The same load for the relay and its baseline.
THREADS = 2
CONNECTIONS = 50
SECONDS = 10
WARMUP_SECONDS = 2


def ensure() -> str:
    """The wrk binary; installed from Debian's packages if missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("wrk is not installed and there is no apt-get to install it")
    say("wrk not found: running `apt-get update` and `apt-get install -y wrk`")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
        result = subprocess.run(
            [*sudo, *command], capture_output=True, text=True, check=False,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is still not on PATH after apt-get install")
    return found


_WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH-WRK {\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d," ..
    "\\"p99_us\\":%d,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(value: str) -> str:
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    eq = "=" * level
    # A long bracket drops a newline right after the opening: keep the text exact.
    return f"[{eq}[\n{value}]{eq}]"


@dataclass
class WrkResult:
    """What wrk measured in one run."""

    requests: int
    duration_s: float
    rps: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float | None = None  # CPU the server process used during the run
    # Redis during the run: fsyncs it postponed (a busy disk; writes wait past 2 s) and
    # forks (an AOF rewrite), each a stall the server's figure would otherwise hide.
    aof_delayed_fsync: int = 0
    redis_forks: int = 0
    rounds_rps: list[float] | None = None  # each round's rate, when merged from rounds

    @property
    def ok(self) -> int:
        """Responses below 400 (wrk counts 4xx/5xx as status errors)."""
        return self.requests - self.non_2xx

    def as_dict(self) -> dict[str, Any]:
        out = {**self.__dict__, "ok": self.ok}
        if self.server_cpu_s is not None and self.requests:
            out["server_cpu_us_per_request"] = round(self.server_cpu_s / self.requests * 1e6, 1)
            out["server_cpu_utilisation"] = round(self.server_cpu_s / self.duration_s, 3)
        return out


def run(url: str, body: bytes, headers: dict[str, str], seconds: float = SECONDS) -> WrkResult:
    """POST `body` to `url` with wrk (2 threads, 50 connections) for `seconds`."""
    binary = ensure()
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-wrk-", delete=False) as f:
        f.write("\n".join(lines) + "\n" + _WRK_DONE)
        script = f.name
    try:
        args = [binary, "-t", str(THREADS), "-c", str(CONNECTIONS),
                "-d", f"{seconds:g}s", "--latency", "-s", script, url]  # fmt: skip
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 30, check=False,
            start_new_session=True,
        )  # fmt: skip
    finally:
        os.unlink(script)
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH-WRK ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(line.removeprefix("BENCH-WRK "))
    duration = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        duration_s=duration,
        rps=data["requests"] / duration if duration else 0.0,
        non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )
