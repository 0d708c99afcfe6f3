"""What the relay would do with events now, without doing it: `relay preview` and
`relay dlq replay --dry-run`.

Runs the worker's own stages on the events (`relay.delivery.prepare`: parse, the
duplicate check, the identity map, the plan with the current mapping, the new-name guard,
the attribute clock), peeking where the worker claims, then the settlement rules
(`relay.delivery.settlement.settle`, as if ChurnZero answered 2xx). Nothing is sent to ChurnZero
and nothing in Redis is written, so an operator can try a mapping or a replay first.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay import keys, retry
from relay.commands import Command
from relay.delivery.prepare import Peeking, Prepared, prepare
from relay.delivery.settlement import Outcomes, Policy, settle
from relay.envelope import Envelope
from relay.errors import DecodeError, RequestError
from relay.ingest import parsing
from relay.mapping import Mapping
from relay.reasons import Deferral, Skip
from relay.resolution import Known
from relay.settings import Settings
from relay.state import deadletter, names

_OK = retry.Outcome(status=200)
# A previewed event's relay id names its place in the request, for its verdict's index.
_PLACE = "preview-"


@dataclass
class Verdict:
    """What would become of one event: `deliver`, `skip`, `wait` or `dead`, and why."""

    index: int
    type: str
    user: str
    outcome: str
    reason: str | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)  # their JSON, sans appKey
    errors: list[Any] = field(default_factory=list)

    @property
    def label(self) -> str:
        """`deliver`, or the outcome and its reason (`skip: unsupported_type`)."""
        return f"{self.outcome}: {self.reason}" if self.reason else self.outcome

    def as_dict(self) -> dict[str, Any]:
        """The verdict as JSON-ready data."""
        return {
            "index": self.index,
            "type": self.type,
            "user": self.user,
            "outcome": self.outcome,
            "reason": self.reason,
            "commands": self.commands,
            "errors": self.errors,
        }


def items_of(body: bytes, source: str | None = None) -> tuple[list[Envelope], list[Verdict]]:
    """Queued envelopes from a Segment event, an array of events or a `{"batch": [...]}`
    wrapper, validated as ingest would; and a verdict for each event ingest would refuse.
    Raises RequestError (400) when the body as a whole is unusable."""
    data = parsing.load_json(body)
    now = datetime.now(UTC)
    wrapped = isinstance(data, dict) and isinstance(data.get("batch"), list)
    # An operator's preview of webhook events stands for a signed request (deletes taken).
    signed = source != "api"
    if wrapped:
        parsed = parsing.parse_api("batch", body, now)
    elif isinstance(data, dict):
        # One event: ingest refuses an invalid one outright; say so as its verdict.
        try:
            parsed = parsing.parse_webhook(body, now, signed=signed)
        except RequestError as exc:
            return [], [Verdict(0, _kind(data), _user(data), "dead", "invalid_event",
                                errors=[str(exc)])]  # fmt: skip
    else:
        parsed = parsing.parse_webhook(body, now, signed=signed)
    source = source or ("api" if wrapped else "webhook")
    refused = [
        Verdict(r.index, _kind(r.event), _user(r.event), "dead", "invalid_event", [], r.errors)
        for r in parsed.rejected
    ] + [
        Verdict(r.index, _kind(r.event), _user(r.event), "skip", Skip.DELETE_REFUSED, [], r.errors)
        for r in parsed.refused_deletes
    ]
    # Accepted events keep their place in the request for the output.
    size = len(parsed.accepted) + len(refused)
    places = [i for i in range(size) if i not in {r.index for r in refused}]
    stamp = now.timestamp()
    items = [
        Envelope.new(e, source=source, received_at=stamp, rid=f"{_PLACE}{place}")
        for e, place in zip(parsed.accepted, places, strict=True)
    ]
    return items, refused


def preview(
    r: Any,
    items: list[Envelope],
    mapping: Mapping,
    settings: Settings,
    *,
    known: dict[str, Known] | None = None,
    now: float | None = None,
) -> list[Verdict]:
    """Each item's verdict, as a worker would settle it now (read-only): the worker's
    own stages (relay.delivery.prepare), peeking instead of claiming.

    `known` adds identities on top of the identity map (a dry run carries what earlier
    pages of a replay would teach), and learns this batch's.
    """
    access = Peeking(r, settings.dedupe_window_s, known)
    return _preview(r, items, mapping, settings, access, time.time() if now is None else now)


def _preview(
    r: Any, items: list[Envelope], mapping: Mapping, settings: Settings, access: Peeking,
    now: float,
) -> list[Verdict]:  # fmt: skip
    prepared = prepare(items, access, mapping, settings)
    if access.known is not None:
        access.known.update(prepared.plan.learned)
    return _verdicts(items, prepared, r, settings, now)


def _verdicts(
    items: list[Envelope], prepared: Prepared, r: Any, settings: Settings, now: float
) -> list[Verdict]:
    """Each item's verdict from its prepared batch, as if ChurnZero answered 2xx."""
    verdicts: dict[str, Verdict] = {}
    for item, errors in prepared.invalid:
        verdicts[item.id] = _verdict(item, "dead", "invalid_event", errors=errors)
    for item in prepared.duplicates:
        verdicts[item.id] = _verdict(item, "skip", Skip.DUPLICATE)
    plan = prepared.plan
    outcomes: Outcomes = {item.id: _OK for item, _ in plan.send}
    settled = settle(plan, outcomes, now, Policy.of(settings))
    commands = {item.id: cmds for item, cmds in plan.send}
    # Names a delivery would send for the first time (in hold mode, prepare held them).
    hold = settings.new_names == "hold"
    new = set() if hold else names.unknown(r, names.sent_names(plan.send))
    for item in settled.delivered:
        fresh = sorted(names.names_of(commands[item.id]) & new)
        notes = [names.note(name) for name in fresh]
        verdicts[item.id] = _verdict(item, "deliver", None, commands[item.id], notes)
    for item, reason in plan.skipped:
        verdicts[item.id] = _verdict(item, "skip", reason)
    by_id = {item.id: item for item in items}
    for entry in settled.dead:
        item = by_id[entry.item["id"]]
        verdicts[item.id] = _verdict(item, "dead", entry.reason.value, errors=entry.errors)
    for batch, _, cause in settled.later:
        for item in batch:
            verdicts[item.id] = _verdict(item, "wait", cause, errors=_WAIT_NOTE.get(cause, []))
    return [verdicts[item.id] for item in items]


_WAIT_NOTE: dict[str, list[str]] = {
    Deferral.IDENTITY_WAIT: [
        "no account/contact ids and no identify for this user yet: it would wait for one, "
        "then be dead-lettered as unresolved_identity"
    ]
}


@dataclass
class DryRun:
    """What a replay would do: counts by outcome, and a few examples of each."""

    total: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        return {"total": self.total, "outcomes": dict(self.outcomes), "samples": self.samples}


def dry_run(
    r: Any,
    pages: Iterable[list[deadletter.DeadLetter]],
    mapping: Mapping,
    settings: Settings,
    *,
    sample: int = 3,
) -> DryRun:
    """What replaying these pages of dead-letter entries would do now (read-only)."""
    now = time.time()

    def items(page: list[deadletter.DeadLetter]) -> list[tuple[str, Envelope | Verdict]]:
        out: list[tuple[str, Envelope | Verdict]] = []
        for entry in page:
            try:
                out.append((entry.id, deadletter.replay_item(entry, now)))
            except DecodeError as exc:  # a replay leaves it where it is
                out.append((entry.id, _verdict_kept(entry, exc)))
        return out

    return dry_run_items(r, map(items, pages), mapping, settings, sample=sample, now=now)


def dry_run_items(
    r: Any,
    pages: Iterable[list[tuple[str, Envelope | Verdict]]],
    mapping: Mapping,
    settings: Settings,
    *,
    sample: int = 3,
    name: str = "entry",
    now: float | None = None,
) -> DryRun:
    """What queuing these pages of (id, envelope) would do now (read-only); a verdict
    in place of an envelope is one decided already. Samples name the id as `name`."""
    out = DryRun()
    # Identities the replay's earlier events would teach, and the attribute clocks they
    # would move: one access for every page.
    access = Peeking(r, settings.dedupe_window_s, known={})
    now = time.time() if now is None else now
    for page in pages:
        ids = [key for key, item in page if isinstance(item, Envelope)]
        items = [item for _, item in page if isinstance(item, Envelope)]
        decided = [(key, item) for key, item in page if not isinstance(item, Envelope)]
        verdicts = _preview(r, items, mapping, settings, access, now) if items else []
        for key, verdict in [*zip(ids, verdicts, strict=True), *decided]:
            out.total += 1
            out.outcomes[verdict.label] += 1
            examples = out.samples.setdefault(verdict.label, [])
            if len(examples) < sample:
                examples.append({name: key, **verdict.as_dict()})
    return out


def entries_pages(
    r: Any,
    *,
    reason: str | None = None,
    ids: list[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    page: int = 500,
) -> Iterable[list[deadletter.DeadLetter]]:
    """Pages of dead-letter entries, read without writing anything (no index snapshot,
    unlike a replay's: a dry run changes nothing, so a plain scan of the index will do)."""
    if ids is not None:
        for start in range(0, len(ids), page):
            yield deadletter.get_many(r, ids[start : start + page])
        return
    index = keys.dlq_reason(reason) if reason else keys.DLQ_INDEX
    low = float("-inf") if since is None else since
    high = float("inf") if until is None else until
    batch: list[str] = []
    for member, score in r.zscan_iter(index, count=page):
        if not low <= score <= high:
            continue
        batch.append(member.decode() if isinstance(member, bytes) else str(member))
        if len(batch) >= page:
            yield deadletter.get_many(r, batch)
            batch = []
    if batch:
        yield deadletter.get_many(r, batch)


def _verdict(
    item: Envelope, outcome: str, reason: str | None, commands: list[Command] | None = None,
    errors: list[Any] | None = None,
) -> Verdict:  # fmt: skip
    place = item.id.removeprefix(_PLACE)
    return Verdict(
        index=int(place) if item.id.startswith(_PLACE) and place.isdigit() else 0,
        type=_kind(item.event),
        user=_user(item.event),
        outcome=outcome,
        reason=reason,
        commands=[c.to_dict() for c in commands or []],
        errors=errors or [],
    )


def _verdict_kept(entry: deadletter.DeadLetter, exc: DecodeError) -> Verdict:
    event = entry.item.get("event")
    errors = [f"not replayable: {exc}"]
    return Verdict(0, _kind(event), _user(event), "dead", entry.reason.value, errors=errors)


def _kind(event: Any) -> str:
    kind = event.get("type") if isinstance(event, dict) else None
    return str(kind) if kind else "?"


def _user(event: Any) -> str:
    if not isinstance(event, dict):
        return ""
    for key in ("userId", "anonymousId"):
        if event.get(key) is not None:
            return f"{key}={event[key]}"
    return ""
