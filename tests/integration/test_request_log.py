"""Ingest's request log (`RELAY_INGEST_LOG`): good requests summed once a second, every
error, non-2xx and rejected event in full; the metrics count every request either way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.integration.conftest import WRITE_KEY, sign, wait_for

pytestmark = pytest.mark.integration
AUTH = (WRITE_KEY, "")
GOOD = {"userId": "u1", "event": "Signed Up"}


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    out = []
    for path in tmp_path.glob("ingest*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def traffic(url: str) -> None:
    for _ in range(5):
        assert requests.post(url + "/v1/track", auth=AUTH, json=GOOD).status_code == 200
    body = json.dumps({"type": "track", "userId": "u2", "event": "E"}).encode()
    assert requests.post(url + "/webhook", data=body,
                         headers={"X-Signature": sign(body)}).status_code == 200  # fmt: skip
    assert requests.post(url + "/v1/track", auth=AUTH, data=b"{not json").status_code == 400
    assert requests.post(url + "/v1/track", auth=("wrong", ""), json=GOOD).status_code == 401
    batch = {"batch": [{"type": "track", "userId": "u3", "event": "E"}, {"type": "track"}]}
    answer = requests.post(url + "/v1/batch", auth=AUTH, json=batch)
    assert answer.status_code == 200 and answer.json()["rejected"]


def request_counts(url: str) -> dict[tuple[str, str], float]:
    counts = {}
    for line in requests.get(url + "/metrics").text.splitlines():
        if line.startswith("relay_ingest_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            route = labels.split('route="')[1].split('"')[0]
            status = labels.split('status="')[1].split('"')[0]
            counts[(route, status)] = float(value)
    return counts


def test_aggregate_sums_good_requests_and_logs_the_rest_in_full(
    r: redis.Redis, start_ingest: Callable[..., str], tmp_path: Path
) -> None:
    url = start_ingest()  # the default: aggregate
    traffic(url)
    wait_for(lambda: any(x["event"] == "ingest_summary" for x in lines(tmp_path)))
    wait_for(
        lambda: (
            sum(x.get("requests", 0) for x in lines(tmp_path) if x["event"] == "ingest_summary")
            == 6
        )
    )
    logged = lines(tmp_path)
    summaries = [x for x in logged if x["event"] == "ingest_summary"]
    assert sum(x["by_route"].get("track", 0) for x in summaries) == 5
    assert sum(x["by_route"].get("webhook", 0) for x in summaries) == 1
    assert sum(x["accepted"] for x in summaries) == 6
    full = [x for x in logged if x["event"] == "ingest"]
    assert sorted(x["status"] for x in full) == [200, 400, 401]  # the batch with a rejection
    bad = next(x for x in full if x["status"] == 400)
    assert "body is not valid JSON" in bad["error"] and bad["route"] == "track"
    assert next(x for x in full if x["status"] == 200)["rejected"] == 1
    expected = {
        ("track", "200"): 5, ("webhook", "200"): 1, ("track", "400"): 1,
        ("track", "401"): 1, ("batch", "200"): 1,
    }  # fmt: skip
    wait_for(lambda: request_counts(url) == expected)  # ingest adds them every second


def test_each_logs_every_request(
    r: redis.Redis, start_ingest: Callable[..., str], tmp_path: Path
) -> None:
    url = start_ingest(ingest_log="each")
    traffic(url)
    wait_for(lambda: len([x for x in lines(tmp_path) if x["event"] == "ingest"]) == 9)
    assert not [x for x in lines(tmp_path) if x["event"] == "ingest_summary"]
    wait_for(lambda: sum(request_counts(url).values()) == 9)
