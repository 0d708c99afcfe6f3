"""The identity map: Segment userId / anonymousId -> ChurnZero account and contact.

Identify calls teach it; track calls without ids are resolved through it. One HASH,
read and written once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from relay import keys
from relay.translate import Ids


def lookup(r: Any, wanted: list[str]) -> dict[str, Ids]:
    """The known identities among these keys (`u:<userId>`, `a:<anonymousId>`)."""
    if not wanted:
        return {}
    found = {}
    for key, raw in zip(wanted, r.hmget(keys.IDENTITY, wanted), strict=True):
        if raw is not None:
            account, contact = orjson.loads(raw)
            found[key] = Ids(account, contact)
    return found


def stage_store(pipe: Any, learned: Mapping[str, Ids]) -> None:
    """Queue on a pipeline: remember these identities."""
    if learned:
        pipe.hset(
            keys.IDENTITY,
            mapping={k: orjson.dumps([v.account, v.contact]) for k, v in learned.items()},
        )
