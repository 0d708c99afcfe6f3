"""The identity map: Segment userId / anonymousId -> ChurnZero account and contact.

Identify calls teach it; track calls without ids are resolved through it. One key per
user (`relay:identity:u:<userId>`, `relay:identity:a:<anonymousId>`) that expires
`identity_ttl_s` after the user's last identify, so the map stays the size of the
active users rather than growing for ever in a Redis that must not evict. Read and
written once per batch.
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
    for key, raw in zip(wanted, r.mget([keys.identity(k) for k in wanted]), strict=True):
        if raw is not None:
            account, contact = orjson.loads(raw)
            found[key] = Ids(account, contact)
    return found


def stage_store(pipe: Any, learned: Mapping[str, Ids], ttl_s: int) -> None:
    """Queue on a pipeline: remember these identities for `ttl_s` seconds."""
    for key, ids in learned.items():
        pipe.set(keys.identity(key), orjson.dumps([ids.account, ids.contact]), ex=ttl_s)
