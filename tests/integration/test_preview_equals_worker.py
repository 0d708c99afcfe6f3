"""`relay preview` runs the worker's own stages: for the same batch on the same Redis, what
it says would become of each event is what the worker then does with it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from relay.delivery.batch import Delivery
from relay.delivery.stage import Report
from relay.envelope import Envelope
from relay.mapping import load_mapping
from relay.ops.preview import preview
from tests.integration.conftest import Sandbox

pytestmark = pytest.mark.integration

IDS = {"accountExternalId": "A", "contactExternalId": "C"}
OLDER, NEWER, NEWEST = "2026-11-28T10:00:00Z", "2026-11-29T10:00:00Z", "2026-11-30T10:00:00Z"


def item(rid: str, **event: Any) -> dict[str, Any]:
    """A queued item as ingest writes it."""
    return Envelope.new(event, source="api", received_at=None, rid=rid).to_dict()


# Delivered first, by a worker counting new names: teaches the names, the attribute
# clock of contact A/C's `plan`, and a delivered messageId.
SEED = [
    item("seed-identify", type="identify", userId="u", messageId="m-seed-identify",
         timestamp=NEWER, traits={**IDS, "plan": "pro"}),
    item("seed-track", type="track", userId="u", messageId="m-delivered", event="Known",
         timestamp=NEWER, properties=IDS),
]  # fmt: skip

BATCH = [
    # An older value of an attribute the clock has seen a newer one of.
    item("stale", type="identify", userId="u", messageId="m-stale", timestamp=OLDER,
         traits={**IDS, "plan": "free"}),
    # A name ChurnZero was never sent, in hold mode.
    item("new-name", type="track", userId="u", messageId="m-new", event="Brand New",
         timestamp=NEWER, properties=IDS),
    # Another copy of an event already delivered.
    item("duplicate", type="track", userId="u", messageId="m-delivered", event="Known",
         timestamp=NEWER, properties=IDS),
    # Nobody knows the user's account yet.
    item("stranger", type="track", userId="stranger", messageId="m-stranger",
         event="Known", timestamp=NEWER),
    # A command ChurnZero would silently drop.
    item("empty-name", type="track", userId="u", messageId="m-empty", event=" ",
         timestamp=NEWER, properties=IDS),
    # No longer a valid event.
    item("invalid", type="track", userId="u", messageId="m-invalid"),
    # Traits of a user with no account yet, parked.
    item("parked", type="identify", userId="newcomer", messageId="m-parked",
         timestamp=NEWER, traits={"plan": "trial"}),
    # An account-level call naming no person.
    item("no-contact", type="group", anonymousId="anon", groupId="G",
         messageId="m-no-contact", timestamp=NEWER, traits={"plan": "pro"}),
    # Delivered.
    item("deliver", type="track", userId="u", messageId="m-deliver", event="Known",
         timestamp=NEWER, properties=IDS),
    # The newest value yet, then one older than it in the same batch.
    item("newest", type="identify", userId="u", messageId="m-newest", timestamp=NEWEST,
         traits={**IDS, "plan": "enterprise"}),
    item("older-in-batch", type="identify", userId="u", messageId="m-older-in-batch",
         timestamp=NEWER, traits={**IDS, "plan": "team"}),
    # The user moved to another contact, which inherits the old contact's clock.
    item("moved", type="identify", userId="u", messageId="m-moved", timestamp=OLDER,
         traits={"accountExternalId": "A", "contactExternalId": "C2", "plan": "free"}),
]  # fmt: skip


def labels_of(report: Report) -> Counter[str]:
    """The worker's report as preview's verdict labels (`skip: duplicate`)."""
    out: Counter[str] = Counter({"deliver": report.delivered})
    for outcome, counts in (("skip", report.skipped), ("dead", report.dead),
                            ("wait", report.retried)):  # fmt: skip
        out.update({f"{outcome}: {reason}": n for reason, n in counts.items()})
    return +out  # without the zeros


def test_preview_says_what_the_worker_then_does(
    make_delivery: Callable[..., Delivery], r: redis.Redis, clean_sandbox: Sandbox
) -> None:
    assert make_delivery().deliver(SEED, "m-seed").delivered == 2
    hold = make_delivery(new_names="hold")

    verdicts = preview(r, [Envelope.from_dict(i) for i in BATCH], load_mapping(None),
                       hold.settings)  # fmt: skip
    said = {rid["id"]: v.label for rid, v in zip(BATCH, verdicts, strict=True)}
    assert said == {
        "stale": "skip: stale_attribute",
        "new-name": "dead: new_name",
        "duplicate": "skip: duplicate",
        "stranger": "wait: identity_wait",
        "empty-name": "dead: invalid_command",
        "invalid": "dead: invalid_event",
        "parked": "skip: parked",
        "no-contact": "dead: no_contact",
        "deliver": "deliver",
        "newest": "deliver",
        "older-in-batch": "skip: stale_attribute",
        "moved": "skip: stale_attribute",
    }

    report = hold.deliver(BATCH, "m-batch")
    assert labels_of(report) == Counter(said.values())
    assert report.attributes["stale_attribute"] == 3
    assert report.contact_changes == 1
