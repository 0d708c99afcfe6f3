"""Failures the operator must see, through real workers: a ChurnZero host that cannot
be reached is a named problem (status, admin API, /metrics, a WARNING with the
exception), the oldest undelivered event's age grows while events sit in the delayed
set or wait for their identity, delivery latency is measured, and refused credentials
are WARNINGs counted by status."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from relay.state import status
from tests.integration.conftest import (
    WRITE_KEY,
    Sandbox,
    Starter,
    metric,
    relay_cli,
    sign,
    wait_for,
)
from tests.procs import free_port

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
ADMIN = {"Authorization": "Bearer t0k"}


def post_tracks(ingest: str, count: int, **properties: Any) -> None:
    ids = {"accountExternalId": "acct", "contactExternalId": "c"} | properties
    batch = [{"type": "track", "userId": f"u{n}", "event": "Logged In", "properties": ids}
             for n in range(count)]  # fmt: skip
    requests.post(ingest + "/v1/batch", json={"batch": batch}, auth=AUTH).raise_for_status()


def log_lines(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def problem_of(r: redis.Redis, kind: str) -> dict[str, Any] | None:
    return next((p for p in status.churnzero_problems(r) if p["kind"] == kind), None)


@pytest.mark.parametrize(
    ("url", "kind", "diagnosis"),
    [
        pytest.param("https://analytics.churnzer0.invalid/i", "dns",
                     "probable configuration error", id="typo"),
        pytest.param("http://127.0.0.1:{port}/i", "refused", "unreachable", id="refused"),
    ],
)  # fmt: skip
def test_a_churnzero_host_that_cannot_be_reached_is_a_named_problem(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter, url: str, kind: str, diagnosis: str,
) -> None:  # fmt: skip
    url = url.format(port=free_port())
    host = url.split("/")[2]
    worker = start_worker(churnzero_url=url, churnzero_allow_http=True)
    ingest = start_ingest(admin_token="t0k")
    post_tracks(ingest, 3)
    wait_for(lambda: problem_of(r, kind) is not None, 60)
    problem = problem_of(r, kind)
    assert problem is not None
    assert problem["diagnosis"] == diagnosis
    assert problem["host"].split(":")[0] == host.split(":")[0]
    assert "RELAY_CHURNZERO_URL" in problem["hint"]
    # Everywhere the operator looks: the admin API, /metrics, relay status.
    report = requests.get(ingest + "/admin/api/status", headers=ADMIN, timeout=5).json()
    assert report["churnzero_problem"]["kind"] == kind
    scrape = requests.get(ingest + "/metrics", timeout=5).text
    assert metric(scrape, "relay_churnzero_problem", kind=kind) == 1
    assert metric(scrape, "relay_churnzero_problem", kind="misconfigured") == 0
    shown = relay_cli(r, "status")
    assert diagnosis in shown.stdout and host.split(":")[0] in shown.stdout, shown.stdout
    # The worker's log: a WARNING naming the host, with the exception.
    warnings = [e for e in log_lines(worker.log) if e.get("event") == "churnzero_unreachable"]
    assert warnings, worker.tail()
    assert warnings[0]["level"] == "warning" and warnings[0]["kind"] == kind
    assert "Traceback" in warnings[0]["exception"]
    # Nothing is lost meanwhile: the events wait to be retried.
    assert r.zcard("relay:dlq:index") == 0
    # The URL is fixed and the workers restarted: the events arrive, the problem clears.
    worker.stop()
    start_worker()
    clean_sandbox.wait_commands(3, timeout=60)
    wait_for(lambda: status.churnzero_problems(r) == [], 30)
    scrape = requests.get(ingest + "/metrics", timeout=5).text
    assert metric(scrape, "relay_churnzero_problem", kind=kind) == 0


def ages(ingest: str) -> dict[str, float]:
    report = requests.get(ingest + "/admin/api/status", headers=ADMIN, timeout=5).json()
    return {"all": report["oldest_age_s"], **report.get("oldest_age_by_state_s", {})}


def grows(read: Callable[[], float]) -> None:
    """The figure comes above 0, and a later reading is higher. (Events move between the
    delayed set, the queue and a worker while retried: a state's figure can read 0 at
    the moment they are elsewhere.)"""
    seen: list[float] = []
    wait_for(lambda: seen.append(read()) or seen[-1] > 0, 30)
    first = seen[-1]
    wait_for(lambda: read() > first + 0.5, 30)


def test_the_oldest_age_grows_while_churnzero_answers_503(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:  # fmt: skip
    clean_sandbox.fault(status=503, for_s=600)
    start_worker()
    ingest = start_ingest(admin_token="t0k")
    post_tracks(ingest, 5)
    # Every event is in the delayed set (retries), none ready or in flight.
    wait_for(lambda: int(r.get("relay:depth:delayed") or 0) == 5 and r.llen("relay") == 0, 60)
    scrape = lambda: requests.get(ingest + "/metrics", timeout=5).text  # noqa: E731
    grows(lambda: metric(scrape(), "relay_queue_oldest_age_seconds"))
    grows(lambda: ages(ingest)["all"])
    grows(lambda: ages(ingest)["delayed"])
    assert metric(scrape(), "relay_queue_oldest_age_by_state_seconds", state="delayed") > 0
    row = re.compile(r"oldest (ready|in flight|delayed \(retries\)) +│ +[1-9]")
    wait_for(lambda: row.search(relay_cli(r, "status").stdout) is not None, 30)
    # ChurnZero is back: once delivered, nothing is old any more.
    clean_sandbox.clear_faults()
    clean_sandbox.wait_commands(5, timeout=60)
    wait_for(lambda: ages(ingest)["all"] == 0, 60)
    assert r.zcard("relay:delayed:received:delayed") == 0


def test_the_oldest_age_grows_while_a_track_waits_for_its_identity(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:  # fmt: skip
    start_worker(identity_wait_s=120)
    ingest = start_ingest(admin_token="t0k")
    track = {"type": "track", "userId": "nobody-yet", "event": "Logged In"}
    requests.post(ingest + "/v1/track", json=track, auth=AUTH).raise_for_status()
    wait_for(lambda: int(r.hget("relay:stats", "retried:identity_wait") or 0) >= 1, 60)
    grows(lambda: ages(ingest)["all"])
    grows(lambda: ages(ingest)["identity_wait"])
    assert ages(ingest)["delayed"] == 0  # the retry states are told apart
    # Its identify arrives: the track is delivered and the age is gone.
    identify = {"type": "identify", "userId": "nobody-yet",
                "traits": {"accountExternalId": "A", "contactExternalId": "C"}}  # fmt: skip
    requests.post(ingest + "/v1/identify", json=identify, auth=AUTH).raise_for_status()
    wait_for(lambda: any(c.get("eventName") == "Logged In" for c in clean_sandbox.commands()), 60)
    wait_for(lambda: ages(ingest)["all"] == 0, 60)


def test_delivery_latency_is_measured_deployment_wide(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str],
    start_worker: Starter,
) -> None:  # fmt: skip
    start_worker()
    ingest = start_ingest()
    post_tracks(ingest, 7)
    scrape = lambda: requests.get(ingest + "/metrics", timeout=5).text  # noqa: E731
    wait_for(lambda: metric(scrape(), "relay_delivery_latency_seconds_count") == 7, 60)
    assert metric(scrape(), "relay_delivery_latency_seconds_bucket", le="+Inf") == 7
    assert metric(scrape(), "relay_delivery_latency_seconds_sum") > 0
    latency = json.loads(relay_cli(r, "status", "--json").stdout)["recent"]["delivery_latency_s"]
    assert latency["count"] == 7 and 0 < latency["p50"] <= latency["p99"]
    assert "delivery latency (5 min)" in relay_cli(r, "status").stdout


def test_refused_credentials_are_warnings_that_say_which_check_failed(
    r: redis.Redis, start_ingest: Callable[..., str], tmp_path: Path
) -> None:
    url = start_ingest()
    body = json.dumps({"type": "track", "userId": "u", "event": "E"}).encode()
    tries = {
        "no_signature": {},
        "signature_mismatch": {"X-Signature": sign(b"another body")},
    }
    for headers in tries.values():
        for _ in range(3):  # a mistyped secret fails every delivery: one line, not three
            assert requests.post(url + "/webhook", data=body, headers=headers).status_code == 401
    answer = requests.post(
        url + "/v1/track", auth=("wrong", ""), json={"userId": "u", "event": "E"}
    )
    assert answer.status_code == 401 and "unknown write key" in answer.json()["error"]
    answer = requests.post(url + "/v1/track", json={"userId": "u", "event": "E"})
    assert answer.status_code == 401 and "HTTP Basic username" in answer.json()["error"]
    logged = [e for path in tmp_path.glob("ingest*.log") for e in log_lines(path)]
    refused = [e for e in logged if e.get("status") == 401]
    assert {e["check"] for e in refused} == {
        "no_signature", "signature_mismatch", "unknown_write_key", "no_write_key",
    }  # fmt: skip
    assert all(e["level"] == "warning" for e in refused)
    assert len([e for e in refused if e["route"] == "webhook"]) == 2
    assert (
        "RELAY_WEBHOOK_SECRET" in next(e for e in refused if e["check"] == "no_signature")["error"]
    )
    # Counted: in /metrics and in the last minutes of relay status.
    scrape = lambda: requests.get(url + "/metrics", timeout=5).text  # noqa: E731
    wait_for(lambda: metric(scrape(), "relay_ingest_requests_total",
                            route="webhook", status="401") == 6)  # fmt: skip
    answers = json.loads(relay_cli(r, "status", "--json").stdout)["recent"]["ingest_requests"]
    assert answers["4xx_by_route"] == {"webhook:401": 6, "track:401": 2}
    assert "webhook:401 x6" in relay_cli(r, "status").stdout


def test_a_503_line_carries_its_reason(
    r: redis.Redis, start_ingest: Callable[..., str], tmp_path: Path
) -> None:
    url = start_ingest(max_queue_depth=2)
    r.set("relay:depth:delayed", 5)  # over the high-water mark
    event = {"userId": "u", "event": "E"}
    wait_for(lambda: requests.post(url + "/v1/track", auth=AUTH, json=event).status_code == 503)
    wait_for(lambda: any(e.get("status") == 503 for p in tmp_path.glob("ingest*.log")
                         for e in log_lines(p)))  # fmt: skip
    line = next(e for p in tmp_path.glob("ingest*.log") for e in log_lines(p)
                if e.get("status") == 503)  # fmt: skip
    assert "high-water mark" in line["reason"]


def test_the_last_minutes_sum_the_minutes_and_leave_out_older_ones(r: redis.Redis) -> None:
    from relay.state import recent

    now = time.time()
    for minute_ago, latencies in ((0, [0.2, 0.2]), (4, [0.2]), (5, [999.0])):
        pipe = r.pipeline()
        recent.stage_latencies(pipe, latencies, now - 60 * minute_ago)
        recent.stage_minute(pipe, {"ingest:webhook:401": 2, "ingest:track:200": 7},
                            now - 60 * minute_ago)  # fmt: skip
        pipe.execute()
    found = recent.read(r, now)
    assert found["delivery_latency_s"]["count"] == 3  # five minutes back is out
    assert found["delivery_latency_s"]["p99"] <= 0.25
    answers = found["ingest_requests"]
    assert answers["by_status"] == {"200": 14, "401": 4}
    assert answers["4xx"] == 4 and answers["4xx_by_route"] == {"webhook:401": 4}
    assert 0 < r.ttl(f"relay:minute:{recent.minute_of(now)}") <= recent.KEEP_S


def test_an_index_entry_left_behind_clears_once_the_delayed_set_is_empty(
    r: redis.Redis,
) -> None:
    from relay.delivery import delayed
    from relay.state import broker

    # A mover of an earlier version moved a batch without taking it out of the index.
    r.zadd("relay:delayed:received:delayed", {"gone": time.time() - 3600})
    assert status.snapshot(r).oldest_by_state["delayed"] == 0  # not believed: the set is empty
    delayed.Mover(r, broker.Queue(r, message_events=500)).move_due()
    assert not r.exists("relay:delayed:received:delayed")


def test_a_preflight_from_an_origin_not_allowed_is_a_warning(
    r: redis.Redis, start_ingest: Callable[..., str], tmp_path: Path
) -> None:
    url = start_ingest(cors_origins="https://app.example.com")
    answer = requests.options(
        url + "/v1/track", headers={"Origin": "https://evil.example",
                                    "Access-Control-Request-Method": "POST"},
    )  # fmt: skip
    assert answer.status_code == 403
    wait_for(lambda: any(e.get("check") == "cors_origin" for p in tmp_path.glob("ingest*.log")
                         for e in log_lines(p)))  # fmt: skip
    line = next(e for p in tmp_path.glob("ingest*.log") for e in log_lines(p)
                if e.get("check") == "cors_origin")  # fmt: skip
    assert line["level"] == "warning" and "https://evil.example" in line["error"]
