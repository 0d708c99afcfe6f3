"""The application `relay serve` runs in each ingest process: ingest, with the admin page
and API mounted under `/admin`.

Ingest (relay.ingest) knows nothing of the admin: the admin reads what it needs through
the keys ingest sets on its application (relay.ingest.webapp), and is mounted here, where
the operator's side of the relay meets the ingest side.
"""

from __future__ import annotations

from aiohttp import web

from relay.ingest import app as ingest
from relay.ops import admin
from relay.settings import Settings


def create_app(settings: Settings, redis_url: str) -> web.Application:
    """Ingest bound to one Redis, with the admin sub-application at `/admin`."""
    app = ingest.create_app(settings, redis_url)
    app.add_subapp("/admin", admin.create_app())
    return app
