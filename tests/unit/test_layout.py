"""The import rule of the package layout (drawn in relay/__init__.py): which role may
import which. Every import counts, at the top of a module or inside a function, typed
only or not."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ROLES = ("core", "state", "ingest", "delivery", "archive", "ops", "dev", "workers")
MAY_IMPORT = {
    "core": {"core"},
    "state": {"core", "state"},
    "ingest": {"core", "state", "ingest"},
    "delivery": {"core", "state", "delivery"},
    "archive": {"core", "state", "archive"},
    "dev": {"core", "dev"},
    "ops": set(ROLES) - {"workers"},
    "workers": {"core", "state", "delivery", "workers"},
}
# The core does no I/O: none of the libraries that reach Redis, the network or Celery.
CORE_MAY_NOT_IMPORT = ("redis", "aiohttp", "celery", "kombu", "httpx", "prometheus_client")


def role_of(module: str) -> str | None:
    """The role of a dotted module name of this project; None for anything else."""
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    if parts[0] != "relay":
        return None
    if len(parts) > 1 and parts[1] in ROLES:
        return parts[1]
    return "core"


def imports(source: str, module: str) -> Iterator[str]:
    """The modules `source` (the text of `module`) imports, as dotted names."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from relay import x` imports the module relay.x when x is one.
            yield from (f"{base}.{alias.name}" for alias in node.names)
            yield base


def violations(module: str, source: str) -> list[str]:
    """What `module` imports against the rule, one line each."""
    role = role_of(module)
    assert role is not None, module
    found = []
    for name in imports(source, module):
        other = role_of(name)
        if other is not None and other not in MAY_IMPORT[role]:
            found.append(f"{module} ({role}) imports {name} ({other})")
        if role == "core" and name.split(".")[0] in CORE_MAY_NOT_IMPORT:
            found.append(f"{module} (core) imports {name}, which does I/O")
    return found


def project_modules() -> Iterator[tuple[str, str]]:
    for top in ("relay", "workers"):
        for path in sorted((REPO / top).rglob("*.py")):
            dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
            yield dotted.removesuffix(".__init__"), path.read_text()


def test_every_module_keeps_the_import_rule() -> None:
    modules = list(project_modules())
    assert len(modules) > 50  # the walk found the package
    found = [line for module, source in modules for line in violations(module, source)]
    assert found == []


def test_every_module_has_a_role_the_rule_names() -> None:
    for module, _ in project_modules():
        parts = module.split(".")
        if parts[0] == "relay" and len(parts) > 2:
            assert parts[1] in ROLES, f"{module} is in a subpackage the rule does not name"


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("relay.ingest.receive", "from relay.delivery import batch", "imports relay.delivery"),
        ("relay.ingest.app", "from relay.ops import admin", "imports relay.ops.admin"),
        (
            "relay.delivery.sending",
            "import relay.ingest.admission",
            "imports relay.ingest.admission",
        ),
        ("relay.state.status", "from relay.delivery.names import x", "(delivery)"),
        ("relay.events", "from relay.state import broker", "imports relay.state.broker"),
        ("relay.plan", "import redis", "does I/O"),
        ("relay.plan", "def f():\n    from aiohttp import web\n", "does I/O"),
        ("relay.dev.sandbox", "from relay.ingest.webapp import json_response", "(ingest)"),
        (
            "relay.delivery.batch",
            "from ..ingest import admission",
            "imports relay.ingest.admission",
        ),
        ("workers.tasks", "from relay.ops import cli", "imports relay.ops.cli"),
    ],
)
def test_the_rule_catches_an_import_against_it(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert found, f"{source!r} in {module} passed"
    assert any(expected in line for line in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("relay.ops.cli", "from relay.delivery import batch\nfrom relay.ingest import app"),
        ("relay.ingest.app", "from relay.state import broker\nfrom relay import keys"),
        ("relay.delivery.batch", "from relay.state import status\nimport orjson"),
        ("workers.tasks", "from relay.delivery.batch import Delivery"),
        ("relay.plan", "from relay import commands\nfrom . import events"),
    ],
)
def test_the_rule_lets_through_what_it_allows(module: str, source: str) -> None:
    assert violations(module, source) == []
