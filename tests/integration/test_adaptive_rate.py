"""The self-tuning rate: told no limit, the workers learn the one ChurnZero enforces from
its 429s, settle just under it, and an explicit RELAY_RATE_LIMIT_RPS still caps them."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis
import requests

from tests.integration.conftest import WRITE_KEY, Sandbox, Starter, relay_cli, settled, wait_for

pytestmark = pytest.mark.integration
HIDDEN_RPS = 40
EVENTS = 800  # about 20 s at the hidden rate: slow start's refusals stay a small share
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def backlog(url: str, n: int) -> None:
    for start in range(0, n, 100):
        batch = [
            {"type": "track", "userId": "u", "event": f"E{i}", "properties": IDS}
            for i in range(start, min(start + 100, n))
        ]
        answer = requests.post(url + "/v1/batch", auth=(WRITE_KEY, ""), json={"batch": batch})
        answer.raise_for_status()


def learned(r: redis.Redis) -> float | None:
    value = json.loads(relay_cli(r, "status", "--json").stdout)["learned_rate_rps"]
    return None if value is None else float(value)


def test_the_relay_learns_a_hidden_limit(
    r: redis.Redis, clean_sandbox: Sandbox, start_ingest: Callable[..., str], start_worker: Starter
) -> None:
    clean_sandbox.fault(rate_limit_rps=HIDDEN_RPS)
    url = start_ingest()
    backlog(url, EVENTS)
    start_worker(churnzero_batch_size=1)
    wait_for(lambda: settled(r) and len(clean_sandbox.commands()) == EVENTS, 120)

    log = clean_sandbox.requests_log()
    rate = learned(r)
    assert rate is not None
    assert HIDDEN_RPS * 0.5 <= rate <= HIDDEN_RPS * 1.3
    # Slow start ends with a few refusals; once learned, hardly anything is refused.
    refused = sum(1 for req in log if req["status"] == 429)
    assert refused / len(log) < 0.1, (refused, len(log))
    later = log[len(log) // 2 :]
    refused = sum(1 for req in later if req["status"] == 429)
    assert refused / len(later) < 0.05, (refused, len(later))


def test_an_explicit_rate_caps_the_learned_one(r: redis.Redis) -> None:
    from relay.delivery.throttle import Throttle

    throttle = Throttle(r, rate_limit_rps=10, outage_threshold=3)
    r.hset("relay:throttle:adaptive", "rate", 50)  # learned above the explicit rate
    throttle.report(successes=5, failures=0, retry_after_s=None)
    assert float(r.hget("relay:throttle:adaptive", "rate") or 0) == 10
    delays = throttle.reserve(5, 5.0)
    assert isinstance(delays, list)
    assert delays[-1] == pytest.approx(0.4, abs=0.02)  # 10/s: slots 0.1 s apart


def test_an_explicit_rate_holds_from_the_first_request(r: redis.Redis) -> None:
    from relay.delivery.throttle import Throttle

    # Nothing learned yet: the explicit rate, not the first guess of a deployment without.
    delays = Throttle(r, rate_limit_rps=50, outage_threshold=3).reserve(5, 5.0)
    assert isinstance(delays, list)
    assert delays[-1] == pytest.approx(0.08, abs=0.01)  # 50/s: slots 20 ms apart
