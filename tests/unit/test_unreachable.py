"""A ChurnZero host that cannot be reached is named: dns, tls, refused or
connect_timeout, with the error and a hint, logged at WARNING once a minute per kind; a
DNS or TLS failure of a host that never answered is a probable configuration error.
Each against a real socket on this machine: no network needed."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from relay.commands import TrackEvent
from relay.delivery.churnzero import ChurnZeroClient, diagnosis
from relay.dev import sandbox
from relay.logs import Every
from relay.retry import Kind
from tests.conftest import make_certs
from tests.procs import free_port

COMMAND = TrackEvent(account="a", contact="c", event_name="Login",
                     event_date="2030-01-02T03:04:05Z")  # fmt: skip


async def send_to(url: str, *, timeout_s: float = 5, times: int = 1) -> tuple[Any, Any]:
    client = ChurnZeroClient(url, "app-key", timeout_s=timeout_s)
    try:
        outcomes = [await client.send([COMMAND]) for _ in range(times)]
        return outcomes[-1], client
    finally:
        await client.close()


async def test_a_typo_in_the_host_is_dns_and_a_probable_configuration_error() -> None:
    with capture_logs() as logs:
        outcome, client = await send_to("https://analytics.churnzer0.invalid/i", times=3)
    assert outcome.unreachable == "dns"
    assert outcome.kind is Kind.RETRYABLE and outcome.label == "connection_error"
    assert "analytics.churnzer0.invalid" in outcome.excerpt
    assert client.host == "analytics.churnzer0.invalid:443"
    assert diagnosis("dns", client.answered) == "probable configuration error"
    [warning] = [e for e in logs if e["event"] == "churnzero_unreachable"]  # once a minute
    assert warning["log_level"] == "warning" and warning["kind"] == "dns"
    assert warning["diagnosis"] == "probable configuration error"
    assert "RELAY_CHURNZERO_URL" in warning["hint"]
    assert warning["exc_info"].__class__.__name__ == "ClientConnectorDNSError"


async def test_a_closed_port_is_refused() -> None:
    port = free_port()
    with capture_logs() as logs:
        outcome, client = await send_to(f"http://127.0.0.1:{port}/i")
    assert outcome.unreachable == "refused"
    assert client.host == f"127.0.0.1:{port}"
    assert diagnosis("refused", client.answered) == "unreachable"
    assert [e["kind"] for e in logs if e["event"] == "churnzero_unreachable"] == ["refused"]


@pytest.fixture
async def tls_port(tmp_path: Path) -> AsyncIterator[int]:
    """An https sandbox whose certificate no one trusts (a CA of the test's own)."""
    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["server.crt"], certs["server.key"])
    runner = web.AppRunner(sandbox.create_app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield port
    await runner.cleanup()


async def test_a_certificate_that_does_not_verify_is_tls(tls_port: int) -> None:
    outcome, client = await send_to(f"https://127.0.0.1:{tls_port}/i")
    assert outcome.unreachable == "tls"
    assert "certificate verify failed" in outcome.excerpt
    assert diagnosis("tls", client.answered) == "probable configuration error"


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listener never accepts and whose backlog is full: a connection to it
    waits for ever, as to a host a firewall drops packets of."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # enough to fill any backlog the kernel rounds 0 up to
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in (*fillers, listener):
        s.close()


async def test_a_host_that_never_accepts_is_connect_timeout(full_backlog: int) -> None:
    outcome, client = await send_to(f"http://127.0.0.1:{full_backlog}/i", timeout_s=1)
    assert outcome.unreachable == "connect_timeout"
    assert outcome.label == "timeout"
    assert diagnosis("connect_timeout", client.answered) == "unreachable"


async def test_a_host_that_answered_once_is_not_called_misconfigured() -> None:
    server = TestServer(sandbox.create_app())
    await server.start_server()
    url = str(server.make_url("/i"))
    client = ChurnZeroClient(url, "app-key", timeout_s=5)
    try:
        assert (await client.send([COMMAND])).kind is Kind.SUCCESS
        assert client.answered
        await server.close()  # ChurnZero goes away: now an outage, not a typo
        await client.send([COMMAND])  # the kept-alive connection is reset: a reset
        outcome = await client.send([COMMAND])
    finally:
        await client.close()
    assert outcome.unreachable == "refused"
    assert diagnosis("dns", client.answered) == "unreachable"


def test_every_lets_one_line_a_key_through_per_interval_and_counts_the_rest() -> None:
    every = Every(10)
    assert every.due("dns", now=0)
    assert not every.due("dns", now=5)
    assert not every.due("dns", now=9)
    assert every.due("tls", now=9)  # each key its own budget
    assert every.due("dns", now=10)
    assert every.suppressed("dns") == 2
    assert every.suppressed("dns") == 0


class CountingRedis:
    """Counts the writes `Problems` makes (it needs only these calls)."""

    def __init__(self) -> None:
        self.recorded: list[str] = []
        self.clears = 0

    def pipeline(self, transaction: bool = True) -> CountingRedis:
        return self

    def hset(self, key: str, field: str, value: bytes) -> None:
        self.recorded.append(field)

    def expire(self, key: str, seconds: int) -> None:
        pass

    def execute(self) -> list[Any]:
        return []

    def delete(self, *names: str) -> None:
        self.clears += 1


def test_a_problem_is_recorded_per_failure_and_cleared_once_by_a_success() -> None:
    from relay.delivery.problems import Problems
    from relay.retry import Outcome

    r = CountingRedis()
    problems = Problems(r, ChurnZeroClient("https://x.invalid/i", "k", timeout_s=1))
    ok = Outcome(status=200)
    problems.seen(ok)  # a record from before this thread started is cleared
    for _ in range(5):
        problems.seen(ok)  # and no more writes while all is well: the delivery path
    assert r.clears == 1 and r.recorded == []
    failed = Outcome(status=None, error="connection_error", excerpt="x", unreachable="dns")
    problems.seen(failed)
    problems.seen(failed)
    assert r.recorded == ["dns", "dns"]
    problems.seen(ok)
    problems.seen(ok)
    assert r.clears == 2
