"""docker-compose.yml cannot run here (no Docker engine); this keeps it honest by review."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
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


def defaults(service: str, env_file: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as `docker compose up` makes it: each `${VAR:-default}` at
    the env file's value, else its default."""

    def value(match: re.Match[str]) -> str:
        return (env_file or {}).get(match.group(1), match.group(2))

    env = compose()["services"][service]["environment"]
    pattern = r"\$\{([A-Z_]+):-([^}]*)\}"
    return {key: re.sub(pattern, value, str(raw)) for key, raw in env.items()}


def settings_of(env: dict[str, str]) -> Any:
    from relay.settings import load_settings

    return load_settings(**{k.removeprefix("RELAY_").lower(): v for k, v in env.items()})


DEV_ENV = ROOT / "relay" / "dev" / "compose.env"


def dev_env_file() -> dict[str, str]:
    lines = DEV_ENV.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_without_credentials_nothing_starts() -> None:
    # A copy of the file run with no .env: no app key, no write key, no plain http.
    from relay.errors import ConfigError

    for service in ("check", "ingest", "worker"):
        env = defaults(service)
        assert env["RELAY_CHURNZERO_APP_KEY"] == "" and env["RELAY_WRITE_KEYS"] == ""
        assert env["RELAY_CHURNZERO_ALLOW_HTTP"] == "false"
        assert env["RELAY_CHURNZERO_URL"] == "https://analytics.churnzero.net/i"
        settings = settings_of(env)
        with pytest.raises(ConfigError, match="RELAY_CHURNZERO_APP_KEY"):
            settings.require_app_key()  # what `relay worker` checks at start
        with pytest.raises(ConfigError, match="RELAY_WRITE_KEYS"):
            settings.require_ingest_auth()  # what `relay serve` checks at start


def test_the_dev_profile_brings_the_sandbox_and_its_settings() -> None:
    services = compose()["services"]
    assert services["sandbox"]["profiles"] == ["dev"]
    assert all("profiles" not in services[s] for s in ("redis", "check", "ingest", "worker"))
    dev = dev_env_file()
    assert dev["COMPOSE_PROFILES"] == "dev"  # the file that sets sandbox values starts it
    assert dev["RELAY_CHURNZERO_URL"] == "http://sandbox:8090/i"
    settings = settings_of(defaults("worker", dev))
    settings.require_app_key()
    settings.require_ingest_auth()
    # Nothing in the compose file itself names the sandbox or its key.
    text = (ROOT / "docker-compose.yml").read_text()
    assert "sandbox:8090" not in text.split("services:")[0].split("x-relay-env")[1]


def test_the_check_runs_before_the_relay_starts() -> None:
    services = compose()["services"]
    assert services["check"]["command"] == ["relay", "check"]
    assert services["check"]["depends_on"]["sandbox"]["required"] is False
    for name in ("ingest", "worker"):
        depends = services[name]["depends_on"]
        assert depends["check"]["condition"] == "service_completed_successfully"


def test_host_ports_come_from_variables_on_loopback_by_default() -> None:
    services = compose()["services"]
    published = [p for service in services.values() for p in service.get("ports", [])]
    assert published and all(
        re.fullmatch(r"\$\{PUBLISH_ADDRESS:-127\.0\.0\.1\}:\$\{[A-Z_]+:-[0-9-]+\}:[0-9]+", p)
        for p in published
    ), published
    # Scaled ingest needs a range, or replicas fight over one host port.
    assert services["ingest"]["ports"] == [
        "${PUBLISH_ADDRESS:-127.0.0.1}:${INGEST_PORTS:-8080-8089}:8080"
    ]


def test_prometheus_loads_the_rules_and_grafana_the_dashboard() -> None:
    services = compose()["services"]
    mounts = {
        v.split(":")[1]: ROOT / v.split(":")[0]
        for name in ("prometheus", "grafana")
        for v in services[name]["volumes"]
        if v.startswith("./")
    }
    for source in mounts.values():
        assert source.exists(), source
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rules in prometheus["rule_files"]:
        assert "/etc/prometheus/" + rules in mounts
    provider = yaml.safe_load(mounts["/etc/grafana/provisioning/dashboards/relay.yml"].read_text())[
        "providers"
    ][0]
    folder = provider["options"]["path"]
    assert any(target.startswith(folder + "/") for target in mounts)
    source = yaml.safe_load(mounts["/etc/grafana/provisioning/datasources/relay.yml"].read_text())[
        "datasources"
    ][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
