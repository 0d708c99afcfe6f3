"""`relay dev`: the whole relay on one machine, for trying it and for development."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from relay.settings import Settings


class DevStack:
    """`relay dev`'s processes: the ChurnZero sandbox (without an app key), ingest and a
    worker, each in its own process group, on the same Redis."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.notes: list[str] = []  # what the banner says of the set-up
        self._env = dict(os.environ, RELAY_REDIS_URL=redis_url)
        self._children: list[subprocess.Popen[bytes]] = []

    @property
    def base(self) -> str:
        """The URL of the ingest server."""
        return f"http://{self.settings.host}:{self.settings.port}"

    def start(self) -> None:
        """Start the processes (the sandbox first: the worker sends to it)."""
        if self.settings.uses_sandbox:
            port = self.settings.sandbox_port
            self._spawn("sandbox", "--port", str(port))
            self._env["RELAY_CHURNZERO_URL"] = f"http://127.0.0.1:{port}/i"
            self._env["RELAY_CHURNZERO_APP_KEY"] = "relay-dev-sandbox"
            self.notes.append(f"ChurnZero sandbox  http://127.0.0.1:{port}/_sandbox/commands")
        if not self.settings.authenticated:
            self._env["RELAY_ALLOW_UNAUTHENTICATED"] = "true"
            self.notes.append(
                "authentication is OFF (set RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS)"
            )
        self._spawn("serve")
        self._spawn("worker")

    def _spawn(self, *args: str) -> None:
        self._children.append(
            subprocess.Popen(
                [sys.executable, "-m", "relay.ops.cli", *args],
                env=self._env,
                start_new_session=True,
            )
        )

    def ready(self, timeout_s: float = 20) -> bool:
        """Whether ingest answered /livez within the timeout."""
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/livez", timeout=1):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def wait(self) -> None:
        """Return once any of the processes has exited."""
        while all(child.poll() is None for child in self._children):
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 15 s) and the embedded Redis."""
        from relay.state import embedded

        for child in self._children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self._children:
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        embedded.stop()

    def banner(self) -> str:
        """What is running where, and curl lines to try it."""
        base, settings = self.base, self.settings
        where = "embedded " + self.redis_url if not settings.redis_url else self.redis_url
        return (
            "\nchurnzero-relay is running\n"
            f"  ingest             {base}/webhook  and  {base}/v1/batch\n"
            f"  metrics            {base}/metrics\n"
            f"  redis              {where}\n" + "".join(f"  {n}\n" for n in self.notes) + "\n"
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
