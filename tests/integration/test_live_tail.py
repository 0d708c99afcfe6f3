"""`relay tail` and the admin API's live panel: a settlement is shown within 2 s, filtered
by user and outcome, with a real ingest, worker and sandbox."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis
import requests

from tests.conftest import ROOT
from tests.integration.conftest import TOKEN, WRITE_KEY, relay_env, url_of

pytestmark = pytest.mark.integration
BOUND_S = 2.0  # the promise: shown within 2 s of the settlement
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


class Lines:
    """The lines a stream yields, read on a thread so a test can wait for one with a bound."""

    def __init__(self, lines: Iterable[Any]) -> None:
        self._queue: queue.Queue[tuple[float, str]] = queue.Queue()

        def pump() -> None:
            # Ends with the stream: closed by the test, or by the process at its end.
            with contextlib.suppress(Exception):
                for line in lines:
                    text = line.decode() if isinstance(line, bytes) else line
                    self._queue.put((time.time(), text.rstrip("\n")))

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 20) -> tuple[float, str]:
        """(when it arrived, the line)."""
        return self._queue.get(timeout=timeout)

    def next_where(self, wanted: Callable[[str], bool], timeout: float = 20) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.next(max(deadline - time.monotonic(), 0.01))
            if wanted(got[1]):
                return got

    def empty(self) -> bool:
        return self._queue.empty()


def send(url: str, *events: dict[str, Any]) -> None:
    requests.post(
        url + "/v1/batch", auth=(WRITE_KEY, ""), json={"batch": list(events)}
    ).raise_for_status()


def track(user: str, name: str, message_id: str, ids: dict[str, str] = IDS) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": name, "messageId": message_id,
            "properties": ids}  # fmt: skip


def test_relay_tail_prints_a_users_settlement_within_two_seconds(
    r: redis.Redis, relay_url: str
) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "relay.ops.cli", "tail", "--json", "--user", "ann"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=relay_env(url_of(r)),
    )  # fmt: skip
    try:
        assert tail.stderr is not None and tail.stdout is not None
        assert "following settlements" in tail.stderr.readline()
        out = Lines(tail.stdout)
        send(
            relay_url,
            track("bob", "Login", "t-bob"),
            track("ann", "Login", "t-ann"),
            {"type": "page", "userId": "ann", "messageId": "t-ann-page"},
        )
        arrived, line = out.next()
        first = json.loads(line)
        assert (first["user"], first["event"], first["outcome"]) == ("ann", "Login", "delivered")
        assert first["message_id"] == "t-ann" and first["commands"][0]["eventName"] == "Login"
        assert arrived - first["at"] < BOUND_S
        _, line = out.next()
        page = json.loads(line)
        assert (page["message_id"], page["outcome"], page["reason"]) == (
            "t-ann-page", "skipped", "unsupported_type",
        )  # fmt: skip
    finally:
        tail.send_signal(signal.SIGINT)
        code = tail.wait(20)
    rest = tail.stderr.read() if tail.stderr else ""
    assert code == 0, rest
    assert "stopped: 2 events shown" in rest and "Traceback" not in rest
    assert out.empty()  # bob's event was not shown


def test_the_live_panel_streams_settlements_of_one_outcome(
    r: redis.Redis, relay_with: Callable[..., str]
) -> None:
    url = relay_with(admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(url + "/admin/api/tail").status_code == 401
    refused = requests.get(url + "/admin/api/tail?outcome=lost", headers=auth)
    assert refused.status_code == 400 and "outcome must be one of" in refused.json()["error"]

    with requests.get(
        url + "/admin/api/tail?outcome=dead", headers=auth, stream=True, timeout=30
    ) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        lines = Lines(stream.iter_lines(chunk_size=1))
        assert lines.next()[1] == ": following settlements"
        too_long = {"accountExternalId": "x" * 101, "contactExternalId": "C1"}
        send(url, track("ann", "Fine", "p-ok"), track("ann", "Bad", "p-dead", too_long))
        arrived, line = lines.next_where(lambda text: text.startswith("data: "))
        dead = json.loads(line.removeprefix("data: "))
        assert (dead["message_id"], dead["outcome"], dead["reason"]) == (
            "p-dead", "dead", "invalid_command",
        )  # fmt: skip
        assert dead["entry"] and dead["user"] == "ann"
        assert arrived - dead["at"] < BOUND_S
