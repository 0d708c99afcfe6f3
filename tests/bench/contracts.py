"""`python -m tests.bench.contracts [--full]`: print the relay's outward contracts as JSON,
to compare two trees (a rename must leave every one of them as it was).

Two of them: the OpenAPI document ingest serves (its paths, each method's operationId and
the component schemas' names; `--full` prints the whole document) and the key registry
(`relay.keys`: every key string and prefix, every key family's prefix and suffix, every
enum of hash fields). Read by introspection, so it runs on an older tree too:

    git worktree add /tmp/base 7c79c6e
    PYTHONPATH=/tmp/base .venv/bin/python tests/bench/contracts.py > /tmp/base.json
    .venv/bin/python tests/bench/contracts.py > /tmp/now.json && diff /tmp/base.json /tmp/now.json

tests/unit/test_contracts.py pins today's against tests/fixtures/contracts.json.
"""

from __future__ import annotations

import enum
import importlib
import sys
from typing import Any

import orjson

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def openapi(full: bool = False) -> dict[str, Any]:
    """The OpenAPI document's paths, their operations' ids and its schemas' names."""
    spec: dict[str, Any] = importlib.import_module("relay.ingest.openapi").SPEC
    if full:
        return spec
    return {
        "paths": {
            path: {m: op.get("operationId") for m, op in item.items() if m in METHODS}
            for path, item in sorted(spec["paths"].items())
        },
        "schemas": sorted(spec.get("components", {}).get("schemas", {})),
    }


def registry() -> dict[str, Any]:
    """Every key string, key family and enum of fields named in `relay.keys`."""
    keys = importlib.import_module("relay.keys")
    strings: dict[str, str] = {}
    families: dict[str, list[str]] = {}
    enums: dict[str, dict[str, str]] = {}
    for name, value in sorted(vars(keys).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, str):
            strings[name] = value
        elif getattr(value, "__module__", None) != keys.__name__:
            continue  # imported, not named here
        elif isinstance(value, type) and issubclass(value, enum.Enum):
            enums[name] = {member.name: str(member.value) for member in value}
        elif hasattr(value, "prefix") and not isinstance(value, type):
            families[name] = [value.prefix, getattr(value, "suffix", "")]
    return {"strings": strings, "families": families, "enums": enums}


def contracts(full: bool = False) -> dict[str, Any]:
    """Both contracts, as one JSON-ready value."""
    return {"openapi": openapi(full), "keys": registry()}


def render(value: dict[str, Any]) -> bytes:
    """The stable JSON text of `value` (sorted keys, indented, one final newline)."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render(contracts(full="--full" in sys.argv[1:])))
