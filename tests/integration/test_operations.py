"""What operators rely on: metrics that move, health that tells the truth, a status CLI
that matches the queue, and logs that never carry a secret."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis
import requests

from tests.integration.conftest import (
    APP_KEY,
    SECRET,
    WRITE_KEY,
    Sandbox,
    Starter,
    metric,
    relay_env,
    settled,
    sign,
    url_of,
    wait_for,
)
from tests.procs import ROOT, free_port, start_redis

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")


def test_metrics_follow_the_events(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    url = start_ingest()
    before = requests.get(url + "/metrics").text
    assert metric(before, "relay_delivered_events_total") == 0
    batch = [{"type": "identify", "userId": "m", "traits": {"accountExternalId": "A",
              "contactExternalId": "C", "plan": "pro"}}] + [
        {"type": "track", "userId": "m", "event": f"E{i}"} for i in range(9)
    ] + [{"type": "page", "userId": "m"}, {"type": "track", "userId": "m"}]  # fmt: skip
    requests.post(url + "/v1/batch", auth=AUTH, json={"batch": batch}).raise_for_status()
    # Ingest adds its own stats to the deployment's every second.
    accepted = {"route": "api", "outcome": "accepted"}
    scrape = lambda: requests.get(url + "/metrics").text  # noqa: E731
    wait_for(lambda: metric(scrape(), "relay_ingest_events_total", **accepted) == 11)
    queued = scrape()
    assert metric(queued, "relay_queue_events", state="ready") == 11
    assert metric(queued, "relay_ingest_events_total", **accepted) == 11
    assert metric(queued, "relay_ingest_events_total", route="api", outcome="rejected") == 1
    assert metric(queued, "relay_dead_letters", reason="invalid_event") == 1
    assert metric(queued, "relay_queue_oldest_age_seconds") > 0
    start_worker()
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == 10)
    after = requests.get(url + "/metrics").text
    assert metric(after, "relay_queue_events", state="ready") == 0
    assert metric(after, "relay_delivered_events_total") == 10
    assert metric(after, "relay_skipped_events_total", reason="unsupported_type") == 1
    assert metric(after, "relay_churnzero_requests_total", outcome="2xx") >= 1
    histogram = "relay_churnzero_request_duration_seconds"
    requests_made = metric(after, histogram + "_count")
    assert requests_made == metric(after, "relay_churnzero_requests_total", outcome="2xx")
    assert metric(after, histogram + "_bucket", le="+Inf") == requests_made
    assert metric(after, histogram + "_sum") > 0
    assert metric(after, "relay_ingest_request_duration_seconds_count", route="batch") == 1


def test_metrics_show_every_ingest_process_whichever_answers_the_scrape(
    r: redis.Redis, start_ingest: Callable[..., str]
) -> None:
    url = start_ingest(ingest_processes=2)
    port = int(url.rsplit(":", 1)[1])
    # Both processes listen before the requests: the kernel spreads new connections.
    wait_for(lambda: len(listeners(port)) == 2)
    sent = 40
    for n in range(sent):  # each on a new connection
        event = {"type": "track", "userId": f"u{n}", "event": "E"}
        assert requests.post(url + "/v1/track", auth=AUTH, json=event).status_code == 200

    def shown() -> float:  # a new connection too: either process may answer
        text = requests.get(url + "/metrics").text
        return metric(text, "relay_ingest_requests_total", route="track", status="200")

    wait_for(lambda: shown() == sent)  # each process adds its stats every second
    assert [shown() for _ in range(8)] == [sent] * 8


def listeners(port: int) -> set[int]:
    """The processes listening on `port`."""
    return {
        c.pid for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    }  # fmt: skip


def test_status_json_matches_the_queue(r: redis.Redis, start_ingest: Callable[..., str]) -> None:
    url = start_ingest()
    for n in range(3):
        requests.post(url + "/v1/batch", auth=AUTH, json={"batch": [
            {"type": "track", "userId": "s", "event": "E"}] * 7 + [
            {"type": "identify", "messageId": f"no-user-{n}"}]
        }).raise_for_status()  # fmt: skip
    env = relay_env(url_of(r))
    out = subprocess.run([sys.executable, "-m", "relay.ops.cli", "status", "--json"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["depth"]["ready"] == 21
    assert data["messages"] == r.llen("relay")
    assert data["dead_letters"]["invalid_event"] == 3
    assert data["depth"]["dead"] == 3
    assert data["rates"]["ingested"]["per_s"] >= 0
    table = subprocess.run([sys.executable, "-m", "relay.ops.cli", "status"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert re.search(r"ready\s.*\b21\b", table.stdout), table.stdout


def test_readyz_and_ingest_turn_503_when_redis_stops(
    tmp_path: Path, start_ingest: Callable[..., str]
) -> None:
    port = free_port()
    server = start_redis(port, tmp_path / "redis")
    try:
        url = start_ingest(redis_url=f"redis://127.0.0.1:{port}/0")
        assert requests.get(url + "/readyz").status_code == 200
        server.terminate()
        server.wait(10)
        deadline = time.monotonic() + 10
        while requests.get(url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readyz still 200 with Redis gone"
            time.sleep(0.1)
        assert requests.get(url + "/livez").status_code == 200
        answer = requests.post(url + "/v1/track", auth=AUTH, json={"userId": "x", "event": "e"})
        assert answer.status_code == 503
        assert answer.headers["Retry-After"]
        server = start_redis(port, tmp_path / "redis")
        deadline = time.monotonic() + 10
        while requests.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        answer = requests.post(url + "/v1/track", auth=AUTH, json={"userId": "x", "event": "e"})
        assert answer.status_code == 200
    finally:
        server.terminate()
        server.wait(10)


def test_no_secret_in_logs(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, tmp_path: Path,
) -> None:  # fmt: skip
    url = start_ingest(log_level="debug")
    worker = start_worker(log_level="debug")
    body = json.dumps({"type": "identify", "userId": "z", "writeKey": WRITE_KEY,
                       "traits": {"accountExternalId": "A", "contactExternalId": "C",
                                  "plan": "x"}}).encode()  # fmt: skip
    signature = sign(body)
    requests.post(url + "/webhook", data=body, headers={"X-Signature": signature})
    requests.post(url + "/webhook", data=body, headers={"X-Signature": "0" * 40})
    requests.post(url + "/v1/track", auth=AUTH, json={"userId": "z", "event": "E"})
    wait_for(lambda: len(clean_sandbox.commands()) == 2 and settled(r))
    assert clean_sandbox.commands()[0]["appKey"] == APP_KEY  # the key was used...
    time.sleep(0.5)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert '"batch"' in logs and '"ingest"' in logs  # canonical lines were written
    for secret in (APP_KEY, WRITE_KEY, SECRET, signature, "dGVzdC13cml0ZS1rZXk6"):
        assert secret not in logs  # ...and never logged
    worker.check_alive()  # it ran with debug logging all along
