"""What the relay's aiohttp applications share: ingest's typed keys and the JSON answer.

`relay.ingest.app.create_app` sets the keys on the root application; the admin sub-application
reads them through `request.config_dict`, so it never imports ingest. `refusal` is the one
place a refused request (`RequestError`) becomes its answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from relay.errors import RequestError

if TYPE_CHECKING:
    # Named for the type checker only: the admin reads these keys without importing them.
    import redis
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from relay.ingest.admission import Admission
    from relay.ingest.publisher import GroupCommit
    from relay.ingest.requestlog import RequestLog
    from relay.settings import Settings

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis")
SYNC_REDIS: web.AppKey[redis.Redis] = web.AppKey("sync_redis")
COMMIT: web.AppKey[GroupCommit] = web.AppKey("commit")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")
DEPLOYMENT: web.AppKey[CollectorRegistry] = web.AppKey("deployment")
REQUEST_LOG: web.AppKey[RequestLog] = web.AppKey("request_log")


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`body` as a JSON answer, serialised by orjson (dead-letter pages and the sandbox's
    command list can be large)."""
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def refusal(exc: RequestError) -> web.Response:
    """The answer to a request refused as a whole: its status and JSON body."""
    return json_response(exc.body, exc.status)
