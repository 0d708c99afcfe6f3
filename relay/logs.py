"""structlog, configured once at each entry point.

JSON lines when stderr is not a terminal, a readable console otherwise. A processor
scrubs anything that looks like a credential, whatever the caller bound.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

# Keys whose values are credentials: dropped from every log line.
SECRET_KEYS = frozenset(
    {"appKey", "app_key", "writeKey", "write_key", "secret", "signature", "authorization",
     "token", "password", "x-signature"}
)  # fmt: skip


def scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace credential-named values with a marker."""
    for key in list(event_dict):
        if key.lower() in SECRET_KEYS or key in SECRET_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog, and route the standard library's logging (Celery's, kombu's,
    aiohttp's) through the same processors, so every line has one format."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(serializer=orjson.dumps)
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            scrub,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=(
            structlog.PrintLoggerFactory(sys.stderr)
            if console
            else structlog.BytesLoggerFactory(sys.stderr.buffer)
        ),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                stamp,
                scrub,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer()
                if console
                else structlog.processors.JSONRenderer(serializer=_json_text),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    logging.captureWarnings(True)  # a library's warning (Celery's, run as root) too
    # A line per task received and succeeded repeats the relay's own canonical "batch"
    # line; their warnings (a task given back) still come through.
    for noisy in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def _json_text(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class Every:
    """A log line's budget: `due(key)` is true at most once per `interval_s` per key,
    and `suppressed(key)` says how many were held back since the last one written."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str, now: float | None = None) -> bool:
        """Whether a line for `key` may be written now (counting one held back if not)."""
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        return True

    def suppressed(self, key: str) -> int:
        """Lines for `key` held back since the last one written; counting starts again."""
        return self._held.pop(key, 0)
