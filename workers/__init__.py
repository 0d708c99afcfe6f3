"""The Celery side of the relay: its app (workers.app), its one task (workers.tasks), its
consumer (workers.consumer) and the replay lane on demand (workers.lanes)."""

import sys

# structlog formats exceptions with rich whenever it can import it. A worker logs JSON or
# plain lines, and rich (with pygments) would be megabytes of every worker's memory; only
# the CLI's tables use it. Set before anything imports structlog: this package comes first.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # None: "not importable"
