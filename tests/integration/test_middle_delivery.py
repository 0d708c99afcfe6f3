"""One batch's delivery in-process (`Delivery.deliver`, what a worker thread runs), on the
test database, against the sandbox's faults: what ChurnZero's gateways answer decides
what becomes of each event, and how long every worker holds back. Log lines are asserted
as structlog event dicts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from relay import keys
from relay.delivery.batch import Delivery, MessageBusy, Report
from relay.delivery.throttle import FIRST_OUTAGE_PAUSE_S, Permit, Throttle
from relay.reasons import Reason
from relay.state import broker, deadletter
from tests.integration.conftest import (
    APP_KEY,
    OwnRedis,
    Sandbox,
    delayed_items,
    event_item,
    wait_for,
)

pytestmark = pytest.mark.integration
Make = Callable[..., Delivery]


def batch(prefix: str, n: int) -> list[dict[str, Any]]:
    return [event_item(f"{prefix}{i}") for i in range(n)]


def requests_made(sandbox: Sandbox) -> int:
    return len(sandbox.requests_log())


def test_a_5xx_defers_the_batch_with_an_attempt_counted(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=503)
    report = delivery.deliver(batch("f", 2), "m-5xx")
    assert report.delivered == 0 and report.retried == {"5xx": 2}
    assert sorted((i["id"], i["attempts"]) for i in delayed_items(r)) == [("f0", 1), ("f1", 1)]
    assert int(r.get(keys.DELAYED_EVENTS)) == 2


def test_a_4xx_dead_letters_with_the_answer(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    clean_sandbox.fault(status=400)
    report = delivery.deliver([event_item("f2")], "m-4xx")
    assert report.dead == {"rejected": 1}
    [entry] = deadletter.list_entries(r)
    assert entry.status == 400 and entry.item["id"] == "f2"


def test_a_pause_in_force_sends_nothing_and_defers_past_it(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    delivery.throttle.report(successes=0, failures=0, retry_after_s=30)
    report = delivery.deliver([event_item("f3")], "m-paused")
    assert clean_sandbox.commands() == [] and report.retried == {"paused": 1}
    [(_, due)] = r.zrange(keys.DELAYED, 0, -1, withscores=True)
    assert due - time.time() >= 28  # past the pause, not at the next backoff


def test_a_429_with_retry_after_holds_back_every_worker_that_long(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    one, other = make_delivery(), make_delivery()  # two worker threads
    clean_sandbox.fault(status=429, retry_after=20)
    sent_at = time.time()
    report = one.deliver(batch("r", 2), "m-429")
    assert report.delivered == 0 and report.retried == {"429": 2}
    # The events come back after the Retry-After, not at the next backoff.
    assert all(i["attempts"] == 1 for i in delayed_items(r))
    assert min(due for _, due in r.zrange(keys.DELAYED, 0, -1, withscores=True)) >= sent_at + 20
    # The other worker sends nothing meanwhile, though ChurnZero would take it now.
    clean_sandbox.reset()
    later = other.deliver([event_item("r2")], "m-after-429")
    assert later.retried == {"paused": 1} and requests_made(clean_sandbox) == 0
    assert 15 < other.throttle.permit().wait_s <= 20


def test_an_outage_costs_one_probe_per_pause_and_the_first_good_probe_resumes(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # One request per event (batch size 1), so requests are counted per event.
    delivery = make_delivery(outage_threshold=2, churnzero_batch_size=1)
    clean_sandbox.fault(status=500)
    delivery.deliver(batch("a", 1), "m-a")
    assert delivery.throttle.permit().go  # one failure: under the threshold
    delivery.deliver(batch("b", 1), "m-b")
    assert not delivery.throttle.permit().go  # two: every worker pauses
    r.delete(keys.PAUSE_UNTIL)  # the pause ran out
    before = requests_made(clean_sandbox)
    probed = delivery.deliver(batch("c", 3), "m-c")  # ChurnZero still down
    assert requests_made(clean_sandbox) - before == 1  # a probe, not the batch
    assert probed.retried == {"5xx": 1, "paused": 2}
    assert delivery.throttle.permit().wait_s > FIRST_OUTAGE_PAUSE_S  # the pause doubled
    clean_sandbox.reset()  # ChurnZero is back
    r.delete(keys.PAUSE_UNTIL)
    resumed = delivery.deliver(batch("d", 3), "m-d")
    assert resumed.delivered == 3 and requests_made(clean_sandbox) == 3
    permit = delivery.throttle.permit()
    assert permit.go and not permit.probe


@pytest.mark.parametrize(
    ("fault", "settings", "label"),
    [
        # ChurnZero took the request but answered too late: it may have the commands.
        ({"latency_ms": 5_000}, {"churnzero_timeout_s": 0.5}, "timeout"),
        ({"drop_connection": True}, {}, "connection_error"),
    ],
)
def test_no_answer_is_retried_and_may_arrive_twice(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox,
    fault: dict[str, Any], settings: dict[str, Any], label: str,
) -> None:  # fmt: skip
    delivery = make_delivery(**settings)
    clean_sandbox.fault(**fault)
    report = delivery.deliver([event_item("n0")], "m-no-answer")
    assert report.delivered == 0 and report.retried == {label: 1}
    assert report.requests == {label: 1}
    # Counted as a possible duplicate (relay_resent_events_total{cause}).
    assert report.resent == {label: 1}
    assert int(r.hget(keys.STATS, f"resent:{label}")) == 1
    assert [(i["id"], i["attempts"]) for i in delayed_items(r)] == [("n0", 1)]
    if label == "timeout":
        # The sandbox had the command before it stalled: the retry sends it again.
        assert [c["eventName"] for c in clean_sandbox.wait_commands(1)] == ["n0"]


def test_an_answer_not_from_churnzero_is_logged_and_pauses_every_worker(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    delivery = make_delivery(churnzero_misconfigured_pause_s=30)
    clean_sandbox.fault(redirect=301, location="https://elsewhere.example/i")
    with capture_logs() as logs:
        report = delivery.deliver(batch("x", 2), "m-moved")
    assert report.delivered == 0 and report.retried == {"misconfigured": 2}
    [line] = [e for e in logs if e["event"] == "churnzero_misconfigured"]
    assert line["log_level"] == "error" and line["status"] == 301
    assert "redirect 301 to https://elsewhere.example/i" in line["problem"]
    assert line["url"] == clean_sandbox.url + "/i"
    assert 25 < delivery.throttle.permit().wait_s <= 30  # the operator has to fix the URL
    assert len(delayed_items(r)) == 2  # nothing counted as delivered, nothing lost


def test_a_batch_of_items_that_are_no_envelopes_is_dead_lettered(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # Items without the relay's id: nothing ingest writes, but another producer might.
    event = {"type": "track", "userId": "u", "event": "E", "messageId": "no-id"}
    report = delivery.deliver([{"source": "api", "event": event}, {"event": event}], "m-bad")
    assert report.dead == {"worker_error": 2}
    entries = deadletter.list_entries(r, reason=Reason.WORKER_ERROR)
    assert [e.item["event"] for e in entries] == [event, event]
    assert all(e.errors[0].startswith("DecodeError: no relay id") for e in entries)
    assert clean_sandbox.commands() == []
    assert int(r.get(keys.DEPTH_INFLIGHT) or 0) == 0  # settled: the message is not redone


def test_an_item_that_is_no_envelope_is_dead_lettered_alone(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # Another producer's item in a message of the relay's own: the others are delivered.
    stranger = {"source": "api", "event": event_item("no-id")["event"]}
    report = delivery.deliver([event_item("f4"), stranger, event_item("f5")], "m-stranger")
    assert report.delivered == 2 and report.dead == {"worker_error": 1}
    assert sorted(c["eventName"] for c in clean_sandbox.commands()) == ["f4", "f5"]
    [entry] = deadletter.list_entries(r)
    assert entry.item == stranger and entry.errors[0].startswith("DecodeError")


class FailingPermit(Throttle):
    """The shared throttle, whose `fail_at`-th permit check raises `error` once."""

    def __init__(self, inner: Throttle, fail_at: int, error: Exception) -> None:
        self.__dict__.update(inner.__dict__)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def permit(self) -> Permit:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return super().permit()


def fail_permit(delivery: Delivery, fail_at: int, error: Exception) -> None:
    delivery.throttle = delivery.sender.throttle = FailingPermit(delivery.throttle, fail_at, error)


def sent_counts(sandbox: Sandbox) -> Counter[str]:
    return Counter(c["eventName"] for c in sandbox.commands())


# One request per event, each after the first waiting for its rate-limit slot and then
# asking the shared throttle (Redis) whether it may still go: the call a blip fails.
PER_EVENT_SLOTS = {"churnzero_batch_size": 1, "rate_limit_rps": 20, "adaptive_rate": False}


def test_a_redis_blip_at_a_chunks_permit_sends_each_event_once(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    delivery = make_delivery(**PER_EVENT_SLOTS)
    fail_permit(delivery, 2, redis.ConnectionError("Redis went away"))  # the 2nd chunk's
    items = batch("p", 4)
    with contextlib.suppress(redis.ConnectionError):
        delivery.deliver(items, "m-permit")
    # Nothing of the run goes on after it: no request of its can reach ChurnZero later.
    assert not asyncio.all_tasks(delivery.sender.loop)
    delivery.deliver(items, "m-permit")  # the message again, as Redis would hand it back
    deferred = delayed_items(r)
    assert [i["id"] for i in deferred] == ["p1"]  # its permit was not given: it waits
    delivery.deliver(deferred, "m-later")  # as the mover gives it back
    delivery.deliver([event_item("q0")], "m-next")
    assert sent_counts(clean_sandbox) == Counter(["p0", "p1", "p2", "p3", "q0"])
    assert not deadletter.list_entries(r)


def test_a_send_that_fails_cancels_its_siblings_and_keeps_what_churnzero_took(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    delivery = make_delivery(**PER_EVENT_SLOTS)
    fail_permit(delivery, 2, RuntimeError("a bug"))
    report = delivery.deliver(batch("s", 4), "m-bug")
    assert not asyncio.all_tasks(delivery.sender.loop)
    # The event ChurnZero took is delivered, not dead-lettered as well.
    assert report.delivered == 1 and report.dead == {"worker_error": 3}
    assert sorted(e.item["id"] for e in deadletter.list_entries(r)) == ["s1", "s2", "s3"]
    delivery.deliver([event_item("t0")], "m-after-bug")
    # No sibling of the failed run sent its request during the next message's run.
    assert sent_counts(clean_sandbox) == Counter(["s0", "t0"])


@pytest.mark.parametrize("message_ids", [True, False])
def test_a_copy_that_runs_after_its_run_record_expired_delivers_nothing_again(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox, message_ids: bool
) -> None:
    items = batch("x", 3)
    if message_ids:
        for item in items:
            item["event"]["messageId"] = "mid-" + item["id"]
    assert delivery.deliver(items, "m-old").delivered == 3
    # A copy of the message (restored after a blip, requeued behind a deep queue) runs
    # once its run record is gone: the record lives an hour, copies may outlive it.
    r.delete(keys.run("m-old"))
    again = delivery.deliver(items, "m-old")
    assert again.delivered == 0 and again.skipped == {"duplicate": 3}
    assert sent_counts(clean_sandbox) == Counter(["x0", "x1", "x2"])


def test_a_request_cut_off_at_the_tasks_deadline_is_counted_as_resent(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # The task's deadline comes before ChurnZero answers and before the client's timeout.
    delivery = make_delivery(task_time_limit_s=8, churnzero_timeout_s=30)
    clean_sandbox.fault(latency_ms=10_000)
    report = delivery.deliver(batch("c", 2), "m-cut")
    assert report.delivered == 0 and report.retried == {"deadline": 2}
    assert report.resent == {"deadline": 2}
    assert int(r.hget(keys.STATS, "resent:deadline")) == 2
    assert not asyncio.all_tasks(delivery.sender.loop)


def test_an_error_after_the_settlement_leaves_what_it_settled_alone(
    delivery: Delivery, r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    # A delete's dead letters are removed after the settlement, by a scan that meets an
    # entry it cannot read (written by hand, or by another program).
    r.hset(keys.DLQ_ENTRIES, "unreadable", b"not json")
    clean_sandbox.fault(status=503)
    gone = {"type": "delete", "userId": "gone", "messageId": "del-1"}
    # From a signed webhook: a delete from the api source is never honoured.
    items = [event_item("w0"), {**event_item("w1"), "source": "webhook", "event": gone}]
    with capture_logs() as logs:
        report = delivery.deliver(items, "m-after")
    assert report.retried == {"5xx": 1} and not report.dead
    assert [i["id"] for i in delayed_items(r)] == ["w0"]  # waits for its retry, once
    assert r.hkeys(keys.DLQ_ENTRIES) == [b"unreadable"]  # w0 is not dead-lettered too
    assert int(r.get(keys.DEPTH_INFLIGHT) or 0) == 0
    assert any(e["event"] == "users_deleted_dead_letters_kept" for e in logs)


class FrozenAfterSending(Throttle):
    """The shared throttle, whose first report (after a run's sends, before its
    settlement) runs `meanwhile` first: what happens while that run is frozen."""

    def __init__(self, inner: Throttle, meanwhile: Callable[[], None]) -> None:
        self.__dict__.update(inner.__dict__)
        self.meanwhile: Callable[[], None] | None = meanwhile

    def report(self, **outcomes: Any) -> float:
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return super().report(**outcomes)


@pytest.mark.parametrize("copy_settles", [True, False])
def test_a_run_frozen_past_its_lease_writes_no_settlement(
    make_delivery: Make, r: redis.Redis, clean_sandbox: Sandbox, copy_settles: bool
) -> None:
    frozen, copy = make_delivery(), make_delivery()
    items = batch("z", 2)
    clean_sandbox.fault(status=503)
    copy_report: list[Report] = []

    def lease_runs_out_and_a_copy_runs() -> None:
        r.delete(keys.run_lock("m-frozen"))  # the frozen run's lease expired
        if copy_settles:
            copy_report.append(copy.deliver(items, "m-frozen"))
        else:  # the copy holds the lease, still working
            copy.claims.claim("m-frozen", len(items))

    fenced = FrozenAfterSending(frozen.throttle, lease_runs_out_and_a_copy_runs)
    frozen.throttle = frozen.sender.throttle = fenced
    if copy_settles:
        report = frozen.deliver(items, "m-frozen")
        assert report.already_settled and copy_report[0].retried == {"5xx": 2}
    else:
        with pytest.raises(MessageBusy):  # given back: it runs again once the copy is done
            frozen.deliver(items, "m-frozen")
    # The events wait for their retry once (the copy's settlement, or none yet), and the
    # in-flight count is not taken down twice.
    assert sorted(i["id"] for i in delayed_items(r)) == (["z0", "z1"] if copy_settles else [])
    assert int(r.get(keys.DEPTH_INFLIGHT) or 0) == (0 if copy_settles else 2)


def test_with_wait_replicas_a_settlement_is_acknowledged_only_once_replicated(
    own_redis: OwnRedis, clean_sandbox: Sandbox
) -> None:
    from relay.mapping import load_mapping
    from relay.settings import Settings

    _, primary = own_redis()
    port = primary.connection_pool.connection_kwargs["port"]
    _, replica = own_redis("--replicaof", "127.0.0.1", str(port))
    wait_for(lambda: replica.info("replication")["master_link_status"] == "up")
    settings = Settings(
        churnzero_url=clean_sandbox.url + "/i", churnzero_app_key=APP_KEY,
        redis_wait_replicas=1, redis_wait_timeout_ms=200, task_time_limit_s=8,
    )  # fmt: skip
    delivery = Delivery(settings, primary, load_mapping(None))
    try:
        assert delivery.deliver([event_item("v0")], "m-replicated").delivered == 1
        assert int(primary.hget(keys.STATS, "replication_waits")) >= 1
        with contextlib.suppress(redis.RedisError):
            replica.shutdown(nosave=True)  # the only replica is gone
        # Settled on the primary alone: the message is given back rather than acked (a
        # failover to a replica without the settlement would deliver it again).
        with pytest.raises(broker.NotReplicated):
            delivery.deliver([event_item("v1")], "m-unreplicated")
    finally:
        delivery.close()
