"""The outward contracts a refactor must not move: the OpenAPI document's paths, operation
ids and schema names, and every Redis key string and counter field of `relay.keys`.

A change here is a change users and running deployments see (clients, dashboards, a
rolling upgrade's older workers). When one is meant, write the new snapshot with
`.venv/bin/python -m tests.bench.contracts > tests/fixtures/contracts.json` and say why in
the commit message and the changelog.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.bench import contracts

SNAPSHOT = Path(__file__).parent.parent / "fixtures" / "contracts.json"


def test_the_openapi_paths_and_operation_ids_are_the_snapshot() -> None:
    assert contracts.openapi() == orjson.loads(SNAPSHOT.read_bytes())["openapi"]


def test_the_redis_keys_and_stats_fields_are_the_snapshot() -> None:
    assert contracts.registry() == orjson.loads(SNAPSHOT.read_bytes())["keys"]


def test_the_snapshot_file_is_what_the_dump_writes() -> None:
    # One writer for the file, so a regenerated snapshot reads as a small diff.
    assert contracts.render(contracts.contracts()) == SNAPSHOT.read_bytes()
