"""The admin page in a real headless Chromium: log in, watch the queue, replay a dead letter.

Uses Debian's `/usr/bin/chromium` driven by Playwright's Python package (Playwright's own
browser download is not used). Without them the tests skip locally and fail in CI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.integration.conftest import TOKEN, WRITE_KEY, Seen, log_in, queued_items

pytestmark = pytest.mark.integration


def test_dashboard_shows_the_queue_and_replays_a_dead_letter(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any, seen: Seen, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    url = start_ingest(admin_token=TOKEN)
    batch = [
        {"type": "track", "userId": "u1", "event": "Signed Up"},
        {"type": "track", "userId": "u1"},  # no event name: dead-lettered as invalid_event
    ]
    answer = requests.post(url + "/v1/batch", auth=(WRITE_KEY, ""), json={"batch": batch})
    assert answer.status_code == 200
    assert len(answer.json()["rejected"]) == 1
    [dead_id] = [i.decode() for i in r.hkeys("relay:dlq:entries")]

    log_in(page, url, TOKEN)
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#depth-ready")).to_have_text("1")
    expect(page.locator("#depth-dead")).to_have_text("1")
    expect(page.locator("#paused-banner")).to_be_hidden()
    rows = page.locator("[data-testid=dlq-row]")
    expect(rows).to_have_count(1)
    row = rows.first
    expect(row).to_have_attribute("data-id", dead_id)
    expect(row).to_contain_text("invalid_event")
    expect(page.locator("#chart polyline")).to_have_count(2)

    row.locator("[data-testid=show]").click()
    detail = page.locator("[data-testid=dlq-detail]")
    expect(detail).to_contain_text('"reason": "invalid_event"')
    expect(detail).to_contain_text('"field": "event"')
    page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)

    row.locator("[data-testid=replay]").click()
    expect(rows).to_have_count(0)
    expect(page.locator("#dlq-empty")).to_be_visible()
    assert r.hlen("relay:dlq:entries") == 0
    replayed = [
        item for item in queued_items(r, "relay.replay") if item.get("replayed_from") == dead_id
    ]
    assert len(replayed) == 1
    assert replayed[0]["event"]["userId"] == "u1"
    expect(page.locator("#depth-dead")).to_have_text("0")
    expect(page.locator("#depth-ready")).to_have_text("2")
    # The replay waits in its own lane, and the page says so.
    expect(page.locator("[data-testid=replay-progress]")).to_contain_text(
        "0 of 1 replayed events delivered, 1 messages queued"
    )

    # Works offline: the page fetched nothing but the relay itself, and raised nothing.
    assert all(u.startswith(url + "/admin") for u in seen.requests), seen.requests
    assert seen.errors == []

    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_wrong_token_and_a_revoked_session_return_to_the_login_form(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any
) -> None:
    from playwright.sync_api import expect

    url = start_ingest(admin_token=TOKEN)
    log_in(page, url, "not-the-token")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("not accepted")
    expect(page.locator("#dashboard")).to_be_hidden()

    page.fill("#token", TOKEN)
    page.click("#login-submit")
    expect(page.locator("#depth-ready")).to_have_text("0")
    # The token stops working mid-session (say, rotated): the next poll gets a 401.
    page.route(
        "**/admin/api/status", lambda route: route.fulfill(status=401, body='{"error": "no"}')
    )
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("401")
    assert page.evaluate("sessionStorage.length") == 0


def test_admin_api_needs_the_bearer_token(r: redis.Redis, start_ingest: Callable[..., str]) -> None:
    url = start_ingest(admin_token=TOKEN)
    assert requests.get(url + "/admin/api/status").status_code == 401
    wrong = requests.get(url + "/admin/api/status", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = requests.get(url + "/admin/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert set(right.json()["depth"]) == {"ready", "in_flight", "delayed", "dead"}
    # The page itself holds no data and is served without the token.
    assert requests.get(url + "/admin").status_code == 200


def test_the_page_names_a_churnzero_problem_and_the_oldest_age_by_state(
    r: redis.Redis, start_ingest: Callable[..., str], page: Any
) -> None:
    import time

    from playwright.sync_api import expect

    from relay.delivery import delayed
    from relay.envelope import Envelope
    from relay.state import status

    url = start_ingest(admin_token=TOKEN)
    host = "analytics.churnzer0.invalid"
    status.record_churnzero_problem(
        r, "dns", f"probable configuration error: Cannot connect to host {host}",
        {"hint": f"{host}:443 does not resolve: check RELAY_CHURNZERO_URL"},
    )  # fmt: skip
    item = {"id": "x1", "source": "api", "received_at": time.time() - 90, "attempts": 1,
            "event": {"type": "track", "userId": "u", "event": "E"}}  # fmt: skip
    pipe = r.pipeline()
    delayed.stage_schedule(pipe, [Envelope.from_dict(item)], time.time() + 3600, "5xx")
    pipe.execute()

    log_in(page, url, TOKEN)
    banner = page.locator("#problem-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("ChurnZero host does not resolve")
    expect(banner).to_contain_text("check RELAY_CHURNZERO_URL")
    expect(page.locator("[data-testid=oldest-by-state]")).to_contain_text("delayed (retries) 1 m")
    expect(page.locator("#oldest-age")).to_contain_text("1 m")
