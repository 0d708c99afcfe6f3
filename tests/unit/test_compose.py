"""docker-compose.yml cannot run here (no Docker engine); this keeps it honest by review."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_redis_keeps_what_it_acknowledged() -> None:
    redis = compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_relay_services_run_the_relay_against_that_redis() -> None:
    services = compose()["services"]
    assert services["ingest"]["command"] == ["relay", "serve"]
    assert services["worker"]["command"] == ["relay", "worker"]
    for name in ("ingest", "worker"):
        service = services[name]
        env = service["environment"]
        assert env["RELAY_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "healthcheck" in service
    assert services["ingest"]["environment"]["RELAY_HOST"] == "0.0.0.0"
    # The image installs exactly the packages that exist at the top level.
    dockerfile = services["ingest"]["build"]["dockerfile_inline"]
    for path in ("pyproject.toml", "relay", "workers"):
        assert path in dockerfile and (ROOT / path).exists()


def test_the_default_environment_starts_ingest_and_worker() -> None:
    # Every `${VAR:-default}` at its default, as `docker compose up` with no .env.
    from relay.settings import load_settings

    env = compose()["services"]["worker"]["environment"]
    defaults = {
        key: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)) for key, value in env.items()
    }
    settings = load_settings(**{k.removeprefix("RELAY_").lower(): v for k, v in defaults.items()})
    settings.require_app_key()  # what `relay worker` checks at start
    settings.require_ingest_auth()  # what `relay serve` checks at start


def test_scaled_ingest_does_not_fight_over_one_host_port() -> None:
    ports = compose()["services"]["ingest"]["ports"]
    assert ports == ["8080-8089:8080"]


def test_prometheus_config_is_shipped() -> None:
    volumes = compose()["services"]["prometheus"]["volumes"]
    source = volumes[0].split(":")[0]
    assert (ROOT / source).exists()
