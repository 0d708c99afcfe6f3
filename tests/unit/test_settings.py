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


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("log_level", "verbose", "RELAY_LOG_LEVEL: must be one of debug, info, warning"),
        ("cors_origins", "example.com", "RELAY_CORS_ORIGINS: 'example.com' is not an origin"),
        ("cors_origins", "https://a.example/", "'https://a.example/' is not an origin"),
        ("redis_url", "localhost:6379", "RELAY_REDIS_URL: 'localhost:6379' is not a Redis URL"),
    ],
)
def test_a_value_that_would_never_work_stops_the_process(
    setting: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^bad configuration: ") as raised:
        load_settings(**{setting: value})
    assert message in str(raised.value)


def test_good_values_pass() -> None:
    assert load_settings(log_level="WARNING").log_level == "warning"
    assert load_settings(cors_origins="https://a.example:8443, *").cors_origins == (
        "https://a.example:8443", "*",
    )  # fmt: skip
    for url in ("redis://r:6379/0", "rediss://r:6380/0", "unix:///tmp/r.sock"):
        assert load_settings(redis_url=url).redis_url == url


def test_a_blank_secret_is_no_secret() -> None:
    # `RELAY_WEBHOOK_SECRET=` (compose's `${RELAY_WEBHOOK_SECRET:-}`): an HMAC key anybody
    # knows must not count as authentication, nor an empty admin token open the admin.
    settings = load_settings(webhook_secret="", admin_token=" ")
    assert settings.webhook_secret is None and settings.admin_token is None
    with pytest.raises(ConfigError, match="RELAY_WEBHOOK_SECRET or RELAY_WRITE_KEYS"):
        settings.require_ingest_auth()
