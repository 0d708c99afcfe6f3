"""Redis URLs and settings: Sentinel and TLS shapes, and the broker settings Celery gets."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.settings import Settings, load_settings
from relay.state import broker, redis_conn

SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/2"


def test_sentinel_url_parts() -> None:
    parts = redis_conn.parse_sentinel(SENTINELS)
    assert parts.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert parts.db == 2
    assert parts.password is None


def test_sentinel_url_with_a_password_for_the_data_nodes() -> None:
    parts = redis_conn.parse_sentinel("sentinel://:s%40cret@h1:1;sentinel://h2:2/0")
    assert parts.password == "s@cret"
    config = broker.celery_config(
        Settings(redis_url="sentinel://:s%40cret@h1:1;sentinel://h2:2/0", redis_master="m"),
        "sentinel://:s%40cret@h1:1;sentinel://h2:2/0",
    )
    assert config["broker_url"] == "sentinel://:s%40cret@h1:1/0;sentinel://:s%40cret@h2:2/0"


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://",
        "sentinel://h:1;redis://h:2",
        "sentinel://h:1/x",
        "sentinel://h/1;sentinel://g/2",
    ],
)
def test_malformed_sentinel_urls_stop_the_start(url: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_"):
        load_settings(redis_url=url, redis_master="m")


def test_celery_gets_every_sentinel_with_the_database_and_the_master_name() -> None:
    settings = Settings(redis_url=SENTINELS, redis_master="relay-primary")
    config = broker.celery_config(settings, SENTINELS)
    # kombu reads the database from the first URL only: each one names it.
    assert config["broker_url"] == (
        "sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26379/2;sentinel://10.0.0.3:26380/2"
    )
    options = config["broker_transport_options"]
    assert options["master_name"] == "relay-primary"
    assert options["visibility_timeout"] == settings.visibility_timeout_s
    assert "broker_use_ssl" not in config


def test_sentinel_needs_a_master_name_and_a_master_name_needs_sentinel() -> None:
    with pytest.raises(ConfigError, match="RELAY_REDIS_MASTER"):
        load_settings(redis_url=SENTINELS)
    with pytest.raises(ConfigError, match="sentinel"):
        load_settings(redis_url="redis://h:6379/0", redis_master="m")


def test_tls_options_reach_celery_and_always_verify(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.crt", "c.crt", "c.key"))
    for path in (ca, cert, key):
        path.write_text("-")
    url = "rediss://redis.example:6380/0"
    settings = Settings(
        redis_url=url, redis_tls_ca_file=ca, redis_tls_cert_file=cert, redis_tls_key_file=key
    )
    config = broker.celery_config(settings, url)
    assert config["broker_url"] == url
    assert config["broker_use_ssl"] == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(ca),
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
    }
    plain = broker.celery_config(Settings(redis_url=url), url)
    assert plain["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_tls_settings_are_refused_where_they_would_be_ignored(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-")
    with pytest.raises(ConfigError, match="rediss://"):
        load_settings(redis_url="redis://h:6379/0", redis_tls_ca_file=ca)
    with pytest.raises(ConfigError, match="go together"):
        load_settings(redis_url="rediss://h:6380/0", redis_tls_cert_file=ca)
    with pytest.raises(ConfigError, match="RELAY_REDIS_TLS_CA_FILE"):
        load_settings(redis_url="rediss://h:6380/0", redis_tls_ca_file=tmp_path / "missing")


def test_unix_sockets_are_spelt_for_kombu() -> None:
    config = broker.celery_config(Settings(), "unix:///tmp/r.sock")
    assert config["broker_url"] == "redis+socket:///tmp/r.sock"
