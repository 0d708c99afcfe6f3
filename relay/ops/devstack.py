"""`relay dev`: the whole relay on one machine, for trying it and for development."""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time

from relay.errors import RelayError
from relay.ingest import auth
from relay.settings import Settings

# What the banner's curl lines send: an identify, then a track of the same user by both
# routes (the webhook body is signed byte for byte, so it is kept as one exact string).
_IDENTIFY = (
    '{"userId":"userId123","traits":{"accountExternalId":"12345678",'
    '"contactExternalId":"john.smith@company.com","firstName":"John"}}'
)
_TRACK = '{"userId":"userId123","event":"Clicked Login Button"}'
_WEBHOOK = '{"type":"track","userId":"userId123","event":"Opened Webhook Example"}'


class DevStackError(RelayError):
    """`relay dev` could not start its processes; the message says why."""


class DevStack:
    """`relay dev`'s processes: the ChurnZero sandbox (without an app key), ingest and a
    worker, each in its own process group, on the same Redis."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.notes: list[str] = []  # what the banner says of the set-up
        self._env = dict(os.environ, RELAY_REDIS_URL=redis_url)
        self._children: list[subprocess.Popen[bytes]] = []
        # The admin page is part of the first minutes: without a token it is off, so a
        # development one is made for this run (printed in the banner, never stored).
        self._token_generated = settings.admin_token is None
        if settings.admin_token is None:
            self._env["RELAY_ADMIN_TOKEN"] = secrets.token_urlsafe(18)
        else:
            self._env["RELAY_ADMIN_TOKEN"] = settings.admin_token.get_secret_value()

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
        if self.settings.uses_sandbox and not self._answers(
            f"http://127.0.0.1:{self.settings.sandbox_port}/healthz", 20
        ):
            raise DevStackError("the ChurnZero sandbox did not start; see the output above")
        self._check()
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

    def _check(self) -> None:
        """`relay check` with the processes' own settings: its warnings and problems are
        printed, and a problem stops `relay dev` before anything runs."""
        command = [sys.executable, "-m", "relay.ops.cli", "check"]
        out = subprocess.run(command, env=self._env, capture_output=True, text=True, check=False)
        for line in (out.stdout + out.stderr).splitlines():
            if not line.startswith("ok "):
                print(f"relay check: {line}", flush=True)
        if out.returncode != 0:
            raise DevStackError("relay check found problems (above): nothing was started")

    def ready(self, timeout_s: float = 20) -> bool:
        """Whether ingest answered /livez within the timeout."""
        return self._answers(self.base + "/livez", timeout_s)

    @staticmethod
    def _answers(url: str, timeout_s: float) -> bool:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1):
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
        """What is running where, and curl lines to try it (with the credentials set)."""
        base, settings = self.base, self.settings
        where = "embedded " + self.redis_url if not settings.redis_url else self.redis_url
        token = (
            f"token {self._env['RELAY_ADMIN_TOKEN']} (made for this run)"
            if self._token_generated else "token: the RELAY_ADMIN_TOKEN set"
        )  # fmt: skip
        lines = [
            "",
            "churnzero-relay is running",
            f"  ingest             {base}/webhook  and  {base}/v1/batch",
            f"  metrics            {base}/metrics",
            f"  admin              {base}/admin/  {token}",
            f"  redis              {where}",
            *(f"  {note}" for note in self.notes),
            "",
            "Try it:",
            *self.try_lines(),
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines) + "\n"

    def try_lines(self) -> list[str]:
        """curl lines a newcomer can paste: they carry the write key or signature set."""
        base, settings = self.base, self.settings
        key = settings.write_keys[0] if settings.write_keys else None
        user = f" -u {shlex.quote(key + ':')}" if key else ""
        json_type = "-H 'Content-Type: application/json'"
        lines = [
            f"  curl -s{user} {base}/v1/identify {json_type} -d {shlex.quote(_IDENTIFY)}",
            f"  curl -s{user} {base}/v1/track {json_type} -d {shlex.quote(_TRACK)}",
        ]
        if settings.webhook_secret is not None:
            signed = auth.signature(settings.webhook_secret.get_secret_value(), _WEBHOOK.encode())
            lines.append(f"  curl -s {base}/webhook {json_type} -H 'X-Signature: {signed}' "
                         f"-d {shlex.quote(_WEBHOOK)}")  # fmt: skip
        else:
            lines.append(f"  curl -s{user} {base}/webhook {json_type} -d {shlex.quote(_WEBHOOK)}")
        if settings.uses_sandbox:
            lines.append(f"  curl -s http://127.0.0.1:{settings.sandbox_port}/_sandbox/commands")
        return lines
