"""The shipped Prometheus alert rules, checked and unit-tested by Prometheus's own promtool
(tests/unit/monitoring/alerts.test.yml feeds them synthetic series)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "relay" / "static" / "monitoring"
RULE_TESTS = Path(__file__).parent / "monitoring" / "alerts.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool (Debian's `prometheus` package; .ci/run installs it): skipped locally when
    missing, a failure in CI."""
    found = shutil.which("promtool")
    if found is None:
        if IN_CI:
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run(promtool: str, *args: str, cwd: Path) -> None:
    out = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_and_the_config_that_loads_them_are_valid(promtool: str) -> None:
    run(promtool, "check", "rules", "alerts.yml", cwd=MONITORING)
    run(promtool, "check", "config", "prometheus.yml", cwd=MONITORING)


def test_the_rules_fire_when_they_should_and_only_then(promtool: str) -> None:
    run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)


def test_every_alert_is_unit_tested_and_names_a_runbook_entry() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case["exp_alerts"]}  # fmt: skip
    for rule in rules:
        assert rule["alert"] in tested, f"{rule['alert']} never seen firing in {RULE_TESTS.name}"
        assert "Runbook: " in rule["annotations"]["description"]


def test_the_docs_list_every_alert_and_hold_every_runbook_entry_named() -> None:
    import re

    operations = (ROOT / "docs" / "operations.md").read_text()
    runbook = operations.split("## Runbook", 1)[1]
    entries = set(re.findall(r"^\* \*\*(.+?)\.\*\*", runbook, flags=re.MULTILINE))
    for rule in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]:
        assert f"`{rule['alert']}`" in operations, f"{rule['alert']} is not in the alert list"
        named = rule["annotations"]["description"].split("Runbook: ", 1)[1].rstrip(".")
        assert named in entries, f"{rule['alert']} names a runbook entry {named!r} missing"
