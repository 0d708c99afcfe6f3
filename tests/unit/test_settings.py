"""Settings that keep events from vanishing: https to ChurnZero, an app key, CORS origins."""

from __future__ import annotations

import pytest

from relay.errors import ConfigError
from relay.ingest import cors
from relay.settings import Settings, load_settings


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8090/i", "http://localhost:8090/i", "http://[::1]:8090/i"]
)
def test_plain_http_is_fine_on_loopback(url: str) -> None:
    assert Settings(churnzero_url=url).churnzero_is_loopback


def test_plain_http_elsewhere_is_refused_naming_the_way_out() -> None:
    with pytest.raises(ConfigError, match="RELAY_CHURNZERO_ALLOW_HTTP"):
        load_settings(churnzero_url="http://analytics.churnzero.net/i")
    allowed = load_settings(churnzero_url="http://proxy.internal/i", churnzero_allow_http=True)
    assert allowed.churnzero_url == "http://proxy.internal/i"


def test_an_app_key_is_required_unless_on_loopback() -> None:
    with pytest.raises(ConfigError, match="RELAY_CHURNZERO_APP_KEY"):
        Settings(churnzero_app_key=None).require_app_key()
    with pytest.raises(ConfigError, match="RELAY_CHURNZERO_APP_KEY"):
        Settings(churnzero_app_key="  ").require_app_key()  # blank is no key
    Settings(churnzero_app_key="k").require_app_key()
    Settings(churnzero_url="http://127.0.0.1:8090/i").require_app_key()


def test_cors_origins_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().cors_origins == ("*",)
    monkeypatch.setenv("RELAY_CORS_ORIGINS", "https://a.example, https://b.example")
    assert Settings().cors_origins == ("https://a.example", "https://b.example")


def test_cors_headers() -> None:
    origins = ("https://app.example",)
    assert cors.response_headers("https://app.example", origins)["Access-Control-Allow-Origin"] == (
        "https://app.example"
    )
    assert cors.response_headers("https://evil.example", origins) == {}
    assert cors.response_headers(None, ("*",)) == {}
    pre = cors.preflight_headers("https://x.example", ("*",), "authorization, content-type")
    assert pre["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in pre["Access-Control-Allow-Methods"]
