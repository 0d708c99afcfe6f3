"""The admin page's newer parts in a real headless Chromium (as test_admin_page.py): the
bulk dry run then replay or purge with progress, the live panel, the trace box, an hour
of chart history that survives a reload, thousands separators and the favicon."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import requests

from relay import keys
from relay.reasons import Reason
from relay.state import deadletter, status
from tests.integration.conftest import TOKEN, WRITE_KEY, Seen, log_in, queued_items

pytestmark = pytest.mark.integration
T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC: the first entry's last failure
IDS = {"accountExternalId": "A1", "contactExternalId": "C1"}


def add(r: redis.Redis, n: int, reason: Reason, event: str, start: int = 0) -> None:
    entries = []
    for i in range(start, start + n):
        body = {"type": "track", "userId": f"u{i}", "event": event, "messageId": f"m{i}"}
        item = {"id": f"r{i}", "source": "api", "received_at": T0, "attempts": 1, "event": body}
        entries.append(deadletter.new_entry(item, reason, now=T0 + i, entry_id=f"e{i:05d}"))
    deadletter.add(r, entries)


def test_bulk_replay_shows_the_dry_run_first_then_progress(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any, seen: Seen
) -> None:
    from playwright.sync_api import expect

    add(r, 1200, Reason.REJECTED, "Login")
    add(r, 3, Reason.NEW_NAME, "Odd", start=5000)
    url = start_ingest(admin_token=TOKEN)
    log_in(page, url, TOKEN)
    expect(page.locator("#depth-dead")).to_have_text("1,203")
    expect(page.locator("#bulk-reason option[value=rejected]")).to_have_text("rejected (1,200)")

    page.select_option("#bulk-reason", "rejected")
    page.click("#bulk-replay")
    summary = page.locator("[data-testid=bulk-summary]")
    expect(summary).to_contain_text("Dry run: a replay of 1,200 dead letters of reason rejected")
    expect(summary).to_contain_text("By event: Login 1,200")
    # What a replay would do now: these users have no account yet.
    expect(summary).to_contain_text("A replay now: still unresolved (waits for an identify) 1,200")
    expect(page.locator("#bulk-confirm")).to_have_text("Replay 1,200")
    assert r.hlen(keys.DLQ_ENTRIES) == 1203  # a dry run changes nothing

    page.click("#bulk-confirm")
    progress = page.locator("[data-testid=bulk-progress]")
    expect(progress).to_have_text("Done: 1,200 of 1,200 replayed.")
    assert r.hlen(keys.DLQ_ENTRIES) == 3
    replayed = {i["replayed_from"] for i in queued_items(r, keys.REPLAY_QUEUE)}
    assert replayed == {f"e{i:05d}" for i in range(1200)}
    expect(page.locator("#depth-dead")).to_have_text("3")
    assert all(u.startswith(url + "/admin") for u in seen.requests), seen.requests
    assert seen.errors == []


def test_bulk_purge_of_a_time_range_can_be_cancelled_then_done(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any
) -> None:
    from playwright.sync_api import expect

    add(r, 10, Reason.REJECTED, "Login")
    url = start_ingest(admin_token=TOKEN)
    log_in(page, url, TOKEN)
    expect(page.locator("#depth-dead")).to_have_text("10")
    page.fill("#bulk-since", "2025-06-15T15:06:43")  # T0 + 3 .. T0 + 6, UTC
    page.fill("#bulk-until", "2025-06-15T15:06:46")
    page.click("#bulk-purge")
    summary = page.locator("[data-testid=bulk-summary]")
    expect(summary).to_contain_text("a purge of 4 all dead letters from 2025-06-15 15:06:43 UTC")
    expect(summary).to_contain_text("By reason: rejected 4")
    page.click("#bulk-cancel")
    expect(summary).to_be_hidden()
    assert r.hlen(keys.DLQ_ENTRIES) == 10

    page.click("#bulk-purge")
    page.click("#bulk-confirm")
    expect(page.locator("[data-testid=bulk-progress]")).to_have_text("Done: 4 of 4 purged.")
    left = sorted(i.decode() for i in r.hkeys(keys.DLQ_ENTRIES))
    assert left == [f"e{i:05d}" for i in (0, 1, 2, 7, 8, 9)]


def test_the_live_panel_and_the_trace_box_follow_an_event(
    r: redis.Redis, relay_with: Callable[..., str], page: Any, seen: Seen
) -> None:
    from playwright.sync_api import expect

    url = relay_with(admin_token=TOKEN)
    log_in(page, url, TOKEN)
    page.fill("#tail-user", "ann")
    page.click("#tail-start")
    expect(page.locator("#tail-state")).to_have_text("following")
    batch = [
        {"type": "track", "userId": "bob", "event": "Login", "messageId": "b-1", "properties": IDS},
        {"type": "track", "userId": "ann", "event": "Login", "messageId": "a-1", "properties": IDS},
    ]
    answer = requests.post(url + "/v1/batch", auth=(WRITE_KEY, ""), json={"batch": batch})
    assert answer.status_code == 200
    rows = page.locator("[data-testid=tail-row]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-message-id", "a-1")
    expect(rows.first).to_contain_text("delivered  ann  Login  a-1  (1 command)")
    page.click("#tail-stop")
    expect(page.locator("#tail-state")).to_have_text("stopped")

    page.fill("#trace-id", "b-1")
    page.click("#trace-submit")
    sighting = page.locator("[data-testid=trace-sighting]")
    expect(sighting).to_contain_text("delivered, at ")
    expect(sighting).to_contain_text("user bob")
    expect(sighting).to_contain_text('"eventName":"Login"')
    page.fill("#trace-id", "nowhere-1")
    page.click("#trace-submit")
    expect(page.locator("[data-testid=trace-output]")).to_contain_text("nowhere-1 is nowhere")
    assert seen.errors == []


def test_an_hour_of_chart_history_survives_a_reload_and_the_favicon_is_served(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any
) -> None:
    from playwright.sync_api import expect

    url = start_ingest(admin_token=TOKEN)
    # Thirty minutes ago, 25,000 events in one second: 2,500/s over its 10-s step.
    pipe = r.pipeline()
    status.stage_rate(pipe, status.Rate.INGESTED, 25_000, time.time() - 1800)
    pipe.execute()
    log_in(page, url, TOKEN)
    for _ in range(2):  # and again after a reload (the session keeps its token)
        expect(page.locator("#chart text").first).to_have_text("2,500/s")
        ingested = page.locator("[data-testid=series-ingested]")
        assert len(ingested.get_attribute("points").split()) == 360
        page.reload()
    icon = requests.get(url + "/admin/favicon.svg")
    assert icon.status_code == 200 and icon.headers["Content-Type"].startswith("image/svg+xml")
    assert page.locator("link[rel=icon]").get_attribute("href") == "/admin/favicon.svg"


def test_a_bulk_step_takes_the_oldest_of_the_selection_and_says_what_is_left(
    r: redis.Redis, start_ingest: Callable[..., str]
) -> None:
    add(r, 1200, Reason.REJECTED, "Login")
    add(r, 5, Reason.NEW_NAME, "Odd", start=5000)
    url = start_ingest(admin_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def post(action: str, **body: Any) -> requests.Response:
        return requests.post(f"{url}/admin/api/dlq/{action}", json=body, headers=auth)

    step = post("replay", reason="rejected", since=T0 + 100, limit=500)
    assert step.json() == {"replayed": 500, "left": 600}
    replayed = sorted(i["replayed_from"] for i in queued_items(r, keys.REPLAY_QUEUE))
    assert replayed == [f"e{i:05d}" for i in range(100, 600)]  # the oldest in the window
    assert post("purge", all=True, until=T0 + 99, limit=10_000).json() == {"purged": 100, "left": 0}
    for bad in (0, 10_001, "5", True):
        refused = post("purge", all=True, limit=bad)
        assert refused.status_code == 400 and "limit must be" in refused.json()["error"]
    assert r.hlen(keys.DLQ_ENTRIES) == 605
    summary = requests.post(f"{url}/admin/api/dlq/summary", json={"all": True}, headers=auth)
    assert summary.json()["by_reason"] == {"rejected": 600, "new_name": 5}
    assert summary.json()["by_event"] == {"Login": 600, "Odd": 5}
