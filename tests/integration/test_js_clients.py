"""Segment's JavaScript clients against the relay, for real: @segment/analytics-next in
headless Chromium (a page on another origin, so CORS preflights happen) and
@segment/analytics-node, both with a client clock three hours fast.

The packages come from the npm registry through tests/js/package.json and its lock file
(`npm ci --prefix tests/js`, run here when node_modules is missing or stale). Without
npm, the registry or Chromium the tests skip locally and fail in CI.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import WRITE_KEY, Sandbox, missing_tool

pytestmark = pytest.mark.integration

JS = ROOT / "tests" / "js"
SKEW_MS = 3 * 3600 * 1000  # the client's clock is three hours fast
# Runs before any page script: every `new Date()` and `Date.now()` is SKEW_MS ahead.
SKEWED_CLOCK = """
(() => {
  const skew = SKEW_MS, RealDate = Date, realNow = Date.now;
  class SkewedDate extends RealDate {
    constructor(...args) { if (args.length === 0) super(realNow() + skew); else super(...args); }
    static now() { return realNow() + skew; }
  }
  globalThis.Date = SkewedDate;
})();
""".replace("SKEW_MS", str(SKEW_MS))


@pytest.fixture(scope="session")
def js_clients() -> Path:
    """tests/js/node_modules, installed from the lock file when missing or stale."""
    modules = JS / "node_modules"
    installed = modules / ".package-lock.json"
    lock = JS / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return modules
    npm = shutil.which("npm")
    if npm is None:
        missing_tool("npm is not installed (apt-get install npm)")
    out = subprocess.run(
        [npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        missing_tool(f"npm ci --prefix tests/js failed: {out.stderr.strip()[-500:]}")
    return modules


def assert_corrected(commands: list[dict[str, Any]], sent_after: datetime) -> None:
    """Track dates are on the relay's clock, not the client's three-hours-fast one."""
    now = datetime.now(UTC)
    for command in commands:
        if command["action"] == "trackEvent":
            when = datetime.fromisoformat(command["eventDate"].replace("Z", "+00:00"))
            assert sent_after.timestamp() - 5 <= when.timestamp() <= now.timestamp() + 5, when


def test_analytics_node_with_a_fast_clock(
    js_clients: Path, relay_url: str, clean_sandbox: Sandbox, tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        missing_tool("node is not installed (apt-get install nodejs)")
    script = tmp_path / "send.js"
    script.write_text(
        SKEWED_CLOCK
        + """
const { Analytics } = require(process.env.CLIENT);
const analytics = new Analytics({ writeKey: process.env.WRITE_KEY, host: process.env.HOST });
analytics.on("error", (err) => { console.error("analytics error", err); process.exitCode = 1; });
analytics.identify({ userId: "node-user",
  traits: { accountExternalId: "acct-node", contactExternalId: "node@example.com", plan: "pro" } });
analytics.track({ userId: "node-user", event: "Exported Report", properties: { quantity: 3 } });
analytics.closeAndFlush({ timeout: 20000 }).then(() => console.log("flushed"));
"""
    )
    started = datetime.now(UTC)
    env = {**os.environ, "CLIENT": str(js_clients / "@segment" / "analytics-node"),
           "WRITE_KEY": WRITE_KEY, "HOST": relay_url}  # fmt: skip
    out = subprocess.run([node, str(script)], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0 and "flushed" in out.stdout, out.stdout + out.stderr
    commands = clean_sandbox.wait_commands(2)
    assert sorted((c["action"], c.get("name") or c.get("eventName")) for c in commands) == [
        ("setAttribute", "plan"), ("trackEvent", "Exported Report")
    ]  # fmt: skip
    assert {c["contactExternalId"] for c in commands} == {"node@example.com"}
    assert_corrected(commands, started)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def page_server(js_clients: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static site on its own origin, with analytics-next's browser bundle under /ajs/."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ajs").symlink_to(js_clients / "@segment" / "analytics-next" / "dist" / "umd")
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", site
    server.shutdown()
    server.server_close()


PAGE = """<!doctype html>
<meta charset="utf-8"><title>shop</title>
<script src="/ajs/index.js"></script>
<script>
window.sent = (async () => {
  const segment = { apiKey: "%(key)s", apiHost: "%(host)s", protocol: "http" };
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
    { writeKey: "%(key)s", cdnSettings: { integrations: { "Segment.io": segment } } });
  await analytics.identify("browser-user", { accountExternalId: "acct-web",
    contactExternalId: "web@example.com", plan: "team" });
  await analytics.track("Clicked Upgrade", { quantity: 2 });
  return "sent";
})();
</script>
"""


def test_analytics_next_in_chromium_delivers_through_cors(
    browser: Any,
    page_server: tuple[str, Path],
    relay_url: str,
    clean_sandbox: Sandbox,
) -> None:
    origin, site = page_server
    host = relay_url.removeprefix("http://") + "/v1"
    (site / "index.html").write_text(PAGE % {"key": WRITE_KEY, "host": host})
    context = browser.new_context()
    context.add_init_script(SKEWED_CLOCK)
    page = context.new_page()
    methods: list[tuple[str, str]] = []
    errors: list[str] = []
    page.on("request", lambda q: methods.append((q.method, q.url)) if "/v1/" in q.url else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    started = datetime.now(UTC)
    try:
        page.goto(origin + "/index.html")
        assert page.evaluate("window.sent") == "sent", errors
        commands = clean_sandbox.wait_commands(2)
    finally:
        context.close()
    assert sorted((c["action"], c.get("name") or c.get("eventName")) for c in commands) == [
        ("setAttribute", "plan"), ("trackEvent", "Clicked Upgrade")
    ], (commands, methods, errors)  # fmt: skip
    assert {(c["accountExternalId"], c["contactExternalId"]) for c in commands} == {
        ("acct-web", "web@example.com")
    }
    assert [m for m, _ in methods if m == "POST"], methods  # the page posted across origins
    assert not [e for e in errors if "CORS" in e], errors
    assert_corrected(commands, started)
