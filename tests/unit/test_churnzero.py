"""The ChurnZero client against the real sandbox app (in-process): redirects are never
followed, only ChurnZero's image counts as arrived, and EIV hashes are what ChurnZero
checks."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from relay import eiv
from relay.commands import TrackEvent
from relay.delivery.churnzero import ChurnZeroClient, misconfiguration
from relay.dev import sandbox
from relay.retry import Kind

COMMAND = TrackEvent(
    account="acct-1",
    contact="jane@example.com",
    event_name="Login",
    event_date="2030-01-02T03:04:05Z",
)


async def send(server: TestServer, *, eiv_secret: str | None = None) -> Any:
    client = ChurnZeroClient(
        str(server.make_url("/i")), "app-key", timeout_s=5, misconfigured_pause_s=42,
        eiv_secret=eiv_secret,
    )  # fmt: skip
    try:
        return await client.send([COMMAND])
    finally:
        await client.close()


async def sandbox_server(**kwargs: Any) -> TestServer:
    server = TestServer(sandbox.create_app(**kwargs))
    await server.start_server()
    return server


async def stats(server: TestServer) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/_sandbox/stats")) as response,
    ):
        return await response.json()


async def set_faults(server: TestServer, **faults: Any) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/_sandbox/faults"), json=faults) as response,
    ):
        assert response.status == 200, await response.text()


async def test_the_pixel_is_a_delivery() -> None:
    server = await sandbox_server()
    try:
        outcome = await send(server)
        assert outcome.kind is Kind.SUCCESS and outcome.misconfigured is None
        assert (await stats(server))["commands"] == 1
    finally:
        await server.close()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_not_followed_and_pauses(status: int) -> None:
    server = await sandbox_server()
    try:
        # The redirect points back at the sandbox itself: following it would "deliver".
        await set_faults(server, redirect=status, location=str(server.make_url("/i")))
        outcome = await send(server)
        assert outcome.status == status
        assert outcome.kind is Kind.RETRYABLE and outcome.label == "misconfigured"
        assert outcome.retry_after_s == 42  # every worker holds back this long
        assert "redirect" in str(outcome.misconfigured)
        seen = await stats(server)
        assert seen["requests"] == 1 and seen["commands"] == 0  # no second, bodyless GET
    finally:
        await server.close()


async def test_a_200_that_is_not_an_image_is_not_a_delivery() -> None:
    server = await sandbox_server()
    try:
        await set_faults(server, html=True)
        outcome = await send(server)
        assert outcome.status == 200
        assert outcome.kind is Kind.RETRYABLE and outcome.label == "misconfigured"
        assert "text/html" in str(outcome.misconfigured)
        assert "Sign in" in outcome.excerpt
        assert (await stats(server))["commands"] == 0
    finally:
        await server.close()


GIF = b"GIF89a\x01\x00\x01\x00"


@pytest.mark.parametrize(
    ("status", "content_type", "head", "location", "problem"),
    [
        (200, "image/gif", GIF, None, None),
        (200, "application/octet-stream", GIF, None, None),  # the pixel, oddly typed
        (204, "", b"", None, "204 with no Content-Type"),
        (200, "text/html", b"<!doctype html>", None, "200 with text/html"),
        (200, "application/json", b"{}", None, "200 with application/json"),
        (301, "", b"", "https://x/i", "redirect 301 to https://x/i"),
        (503, "text/html", b"", None, None),  # a gateway error: retried as such
    ],
)
def test_misconfiguration(
    status: int, content_type: str, head: bytes, location: str | None, problem: str | None
) -> None:
    found = misconfiguration(status, content_type, head, location)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_eiv_hash_is_hex_hmac_sha256() -> None:
    # RFC 4231 test case 2: HMAC-SHA256 with key "Jefe".
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert eiv.id_hash("Jefe", "what do ya want for nothing?") == expected
    assert (
        eiv.id_hash("s3cret", "acct-1")
        == hmac.new(b"s3cret", b"acct-1", hashlib.sha256).hexdigest()
    )


async def test_strict_sandbox_drops_unhashed_commands_and_takes_hashed_ones() -> None:
    server = await sandbox_server(eiv_secret="tenant-secret")
    try:
        assert (await send(server)).kind is Kind.SUCCESS  # ChurnZero says 200 regardless
        assert (await stats(server))["unverified"] == 1
        assert (await send(server, eiv_secret="wrong-secret")).kind is Kind.SUCCESS
        assert (await stats(server))["unverified"] == 2
        assert (await send(server, eiv_secret="tenant-secret")).kind is Kind.SUCCESS
        seen = await stats(server)
        assert seen["unverified"] == 2 and seen["commands"] == 1
    finally:
        await server.close()


def test_signed_command_carries_both_hashes() -> None:
    signed = eiv.signed(COMMAND.to_dict(), "k")
    assert signed[eiv.ACCOUNT_HASH] == eiv.id_hash("k", "acct-1")
    assert signed[eiv.CONTACT_HASH] == eiv.id_hash("k", "jane@example.com")
    assert eiv.verified(signed, "k") and not eiv.verified(COMMAND.to_dict(), "k")


async def test_churnzero_receives_the_commands_json_after_the_app_key() -> None:
    server = await sandbox_server()
    try:
        await send(server)
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/_sandbox/commands")) as response,
        ):
            [received] = await response.json()
        assert list(received.items()) == [
            ("appKey", "app-key"), ("accountExternalId", "acct-1"),
            ("contactExternalId", "jane@example.com"), ("action", "trackEvent"),
            ("eventName", "Login"), ("eventDate", "2030-01-02T03:04:05Z"), ("quantity", 1),
        ]  # fmt: skip
    finally:
        await server.close()
