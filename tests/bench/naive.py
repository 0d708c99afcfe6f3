"""The e2e baseline: the pipeline one writes first, one Celery task and one POST per event.

Run its worker with `celery -A tests.bench.naive worker -Q bench-naive`; the broker
(`BENCH_REDIS_URL`) and the sandbox (`BENCH_SANDBOX_URL`) come from the environment.
Celery's defaults otherwise, as a first version would have them.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import requests
from celery import Celery

QUEUE = "bench-naive"
TASK = "bench.naive_deliver"


def make_app(broker_url: str) -> Celery:
    """A Celery app on the bench database, routing the naive task to its own queue."""
    app = Celery("bench-naive", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
_local = threading.local()


def _session() -> requests.Session:
    # Keep-alive per pool thread: the baseline is naive, not deliberately slow.
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


@app.task(name=TASK)
def naive_deliver(event: dict[str, Any]) -> None:
    """Translate one track event and POST it alone to ChurnZero."""
    properties = event.get("properties") or {}
    command = {
        "appKey": os.environ.get("BENCH_APP_KEY", "bench-app-key"),
        "accountExternalId": properties.get("accountExternalId"),
        "contactExternalId": properties.get("contactExternalId"),
        "action": "trackEvent",
        "eventName": event["event"],
        "eventDate": event["timestamp"],
        "quantity": properties.get("quantity", 1),
    }
    response = _session().post(os.environ["BENCH_SANDBOX_URL"] + "/i", json=[command], timeout=10)
    response.raise_for_status()
