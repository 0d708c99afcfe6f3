"""The queue's counts and the deployment's stats in-process, on a real Redis: every way
into the queue counts what it queued, and `relay status` and `/metrics` show the
counters their writers name."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import redis
import requests
from prometheus_client import CollectorRegistry, generate_latest

from relay import keys
from relay.delivery import delayed
from relay.envelope import Envelope
from relay.ingest.metrics import DeploymentCollector
from relay.keys import Stat
from relay.reasons import Reason
from relay.state import broker, deadletter, status
from tests.conftest import ROOT
from tests.integration.conftest import metric, queued_items

pytestmark = pytest.mark.integration


def items(n: int, prefix: str = "e") -> list[dict[str, Any]]:
    event = {"type": "track", "userId": "u", "event": "E", "timestamp": "2026-11-29T10:00:00Z"}
    return [{"id": f"{prefix}{i}", "source": "api", "received_at": time.time(), "attempts": 0,
             "event": {**event, "messageId": f"{prefix}{i}"}} for i in range(n)]  # fmt: skip


def scrape(r: redis.Redis) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(r))
    return generate_latest(registry).decode()


def test_every_way_into_the_queue_counts_what_it_queued(r: redis.Redis) -> None:
    queue = broker.Queue(r, message_events=2)
    queue.publish(items(3))  # relay identities forget, in messages of 2 and 1
    pipe = r.pipeline()
    delayed.stage_schedule(pipe, [Envelope.from_dict(i) for i in items(2, "retry")], due=0)
    pipe.execute()
    assert delayed.Mover(r, queue).move_due() == 2  # the mover
    dead = [deadletter.new_entry(item, Reason.REJECTED) for item in items(4, "dead")]
    deadletter.add(r, dead)
    replayed = deadletter.replay(r, [e.id for e in dead], queue)  # a replay
    assert replayed == 4
    assert r.llen(keys.QUEUE) == 3 and r.llen(keys.REPLAY_QUEUE) == 2
    assert [i["id"] for i in queued_items(r)] == ["e0", "e1", "e2", "retry0", "retry1"]
    report = status.report(r)
    assert report["depth"] == {"ready": 9, "in_flight": 0, "delayed": 0, "dead": 0}
    assert report["messages"] == 5
    assert report["replay"] == {"queued_messages": 2, "replayed": 4, "delivered": 0}
    assert report["counters"] == {"dead_letters:rejected": 4, "replayed": 4}
    text = scrape(r)
    assert metric(text, "relay_queue_events", state="ready") == 9
    assert metric(text, "relay_replayed_events_total") == 4
    assert metric(text, "relay_dead_lettered_events_total", reason="rejected") == 4


def test_counters_written_by_their_names_show_under_their_metrics(r: redis.Redis) -> None:
    pipe = r.pipeline()
    status.stage_counts(pipe, {Stat.DELIVERED: 5, Stat.SKIPPED.of("duplicate"): 2,
                               Stat.REQUESTS.of("2xx"): 1, Stat.RETRIED.of("5xx"): 0})  # fmt: skip
    status.stage_request_seconds(pipe, [0.02, 0.02, 3.0])
    status.stage_rate(pipe, status.Rate.DELIVERED, 5, time.time() - 1)
    pipe.execute()
    text = scrape(r)
    assert metric(text, "relay_delivered_events_total") == 5
    assert metric(text, "relay_skipped_events_total", reason="duplicate") == 2
    assert metric(text, "relay_churnzero_requests_total", outcome="2xx") == 1
    assert "cause=" not in text  # a zero is not written
    assert metric(text, "relay_replayed_events_total") == 0  # unlabelled: shown at 0
    duration = "relay_churnzero_request_duration_seconds"
    assert metric(text, duration + "_bucket", le="0.025") == 2
    assert metric(text, duration + "_bucket", le="5.0") == 3
    assert metric(text, duration + "_count") == 3
    assert metric(text, duration + "_sum") == pytest.approx(3.04)
    report = status.report(r)
    assert sum(report["rates"]["delivered"]["series"]) == 5
    assert report["counters"]["skipped:duplicate"] == 2


def test_every_metric_the_dashboard_and_alerts_read_is_served(relay_url: str) -> None:
    # A renamed metric would leave a panel empty and an alert silent without a word.
    monitoring = ROOT / "relay" / "static" / "monitoring"
    read = (monitoring / "grafana-dashboard.json").read_text() + (
        monitoring / "alerts.yml"
    ).read_text()
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"relay_\w+", read)}
    text = requests.get(relay_url + "/metrics", timeout=10).text
    served = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    served |= {name + "_total" for name in served}
    assert sorted(families - served) == []
