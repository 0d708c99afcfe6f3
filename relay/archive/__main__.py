"""`python -m relay.archive`: the archiver alone, the child `relay worker` supervises.

A process of its own that imports what archiving needs and nothing of the CLI or the
queue (no click, Celery or kombu; tests/unit/test_archive_records.py checks it), so that
the archiver beside the delivery processes stays small. `relay archive` runs the same
loop from the CLI, for an operator who runs the archiver as a service of its own.
"""
# ruff: noqa: E402  (rich is barred before anything imports structlog)

from __future__ import annotations

import os
import sys

# structlog's console renderer would import rich for its tracebacks: plain ones serve the
# archiver's rare errors, at a fraction of the memory.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None reads "not installed"
# Arrow's allocator chosen before pyarrow starts: the C one (archiver.main says why),
# whose arenas the supervisor's MALLOC_ARENA_MAX bounds; Arrow's default, set up at
# import, would keep pages of its own even once `main` switches away from it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from relay import logs
from relay.archive import archiver
from relay.errors import ConfigError
from relay.settings import load_settings
from relay.state import embedded, redis_conn


def main() -> int:
    """Archive until SIGTERM or SIGINT; the exit status (2: bad configuration, no Redis)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"relay archiver: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    url = settings.redis_url or embedded.running_url(settings.state_dir)
    if url is None:
        print("relay archiver: set RELAY_REDIS_URL (no embedded Redis runs here)", file=sys.stderr)
        return 2
    return archiver.main(settings, redis_conn.sync_client(settings, url))


if __name__ == "__main__":
    sys.exit(main())
