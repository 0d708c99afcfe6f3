"""The HTTP API's JSON bodies other than Segment's events (`relay.events`): what ingest,
its probes and the admin API answer, and the two request bodies they read.

Typed dicts, because a body is a dict: the handlers build their answers as dict literals
for orjson (no model instance on the hot path) and read the request bodies key by key.
pydantic makes these types the OpenAPI document's schemas (`relay.ingest.openapi`), and the tests
validate what the server answers against them, so the document cannot drift from the
code. A body's keys are closed, except where it carries what other code wrote (a dead
letter, a trace sighting).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, WithJsonSchema, with_config
from typing_extensions import TypedDict  # not typing's: pydantic needs this one before 3.12

from relay import reasons
from relay.events import Event
from relay.ingest import parsing

_CLOSED = ConfigDict(extra="forbid")
_OPEN = ConfigDict(extra="allow")

Count = Annotated[int, Field(ge=0)]
REASON_SCHEMA = {"type": "string", "enum": [reason.value for reason in reasons.Reason]}
Reason = Annotated[
    str, WithJsonSchema(REASON_SCHEMA), Field(description="why the event was dead-lettered")
]


# --- ingest ------------------------------------------------------------------------------


@with_config(_CLOSED)
class Error(TypedDict):
    """A refused request: nothing was queued."""

    error: Annotated[str, Field(description="what was wrong, in words")]
    code: NotRequired[
        Annotated[
            str,
            Field(description="ingest routes: `invalid_request`, `unauthorized`, `forbidden`, "
                  "`request_timeout` or `unavailable` (older analytics-python reads it)"),
        ]
    ]  # fmt: skip
    message: NotRequired[Annotated[str, Field(description="ingest routes: `error` again")]]


@with_config(_CLOSED)
class FieldError(TypedDict):
    """One reason an event is invalid."""

    field: Annotated[str, Field(description="the field, dotted (`properties.quantity`)")]
    message: str


@with_config(_CLOSED)
class RejectedEvent(TypedDict):
    """An event of an accepted request that was not queued: an invalid one (dead-lettered
    as `invalid_event`), or a `delete` without a valid webhook signature (refused,
    changing nothing)."""

    index: Annotated[Count, Field(description="its place in the request's events")]
    errors: list[FieldError]


@with_config(_CLOSED)
class Accepted(TypedDict):
    """The events are durably in Redis; the invalid ones of a batch are listed."""

    success: Literal[True]
    accepted: NotRequired[Annotated[Count, Field(description="events queued")]]
    rejected: NotRequired[list[RejectedEvent]]


@with_config(_CLOSED)
class Liveness(TypedDict):
    """The process answers."""

    status: Literal["ok"]


@with_config(_CLOSED)
class Readiness(TypedDict):
    """Whether ingest accepts events now, and the figures it decides by."""

    status: Literal["ready", "unready"]
    reason: NotRequired[Annotated[str, Field(description="why not ready")]]
    waiting: Annotated[Count, Field(description="events waiting for delivery")]
    memory_fraction: Annotated[float, Field(description="Redis used_memory / maxmemory")]


# --- requests read key by key ------------------------------------------------------------


@with_config(_OPEN)
class BatchRequest(TypedDict):
    """A tracking-API batch (`/v1/batch`, `/v1/import`); its invalid events are
    dead-lettered and listed, the others queued."""

    batch: Annotated[list[Event], Field(max_length=parsing.MAX_BATCH_EVENTS)]
    context: NotRequired[Annotated[dict[str, Any], Field(description="each event's default")]]
    integrations: NotRequired[Annotated[dict[str, Any], Field(description="each event's default")]]
    sentAt: NotRequired[
        Annotated[str | float, Field(description="when the client sent it: to correct clocks")]
    ]
    writeKey: NotRequired[
        Annotated[str, Field(description="on /v1/*, instead of HTTP Basic; never stored")]
    ]


class Selection(TypedDict, total=False):
    """Which dead letters: `ids`, or `all: true`, or a `reason` (these two within
    `since`/`until`); with `limit`, only that many of them, the oldest (a bulk step)."""

    ids: list[str]
    all: bool
    reason: Reason
    since: Annotated[float, Field(description="last failed at or after (unix seconds)")]
    until: Annotated[float, Field(description="last failed at or before (unix seconds)")]
    limit: Annotated[int, Field(ge=1, le=10_000, description="at most this many, oldest first")]


# --- the admin API -----------------------------------------------------------------------


@with_config(_CLOSED)
class Rate(TypedDict):
    """Events per second over the last minute."""

    per_s: float
    series: list[int]


@with_config(_CLOSED)
class Problem(TypedDict):
    """A ChurnZero problem seen lately: an answer that cannot be ChurnZero's, or its host
    unreachable."""

    kind: Annotated[str, Field(description="misconfigured, dns, tls, refused or connect_timeout")]
    problem: Annotated[str, Field(description="what was seen, in words")]
    at: Annotated[float, Field(description="when it was last seen (unix time)")]
    url: NotRequired[str]
    host: NotRequired[str]
    error: NotRequired[str]
    hint: NotRequired[Annotated[str, Field(description="what to check")]]
    diagnosis: NotRequired[
        Annotated[str, Field(description="probable configuration error, or unreachable")]
    ]


@with_config(_CLOSED)
class Latency(TypedDict):
    """Receipt to ChurnZero's 2xx of the events delivered in the last minutes."""

    count: Count
    p50: float | None
    p99: float | None


@with_config(_CLOSED)
class IngestAnswers(TypedDict):
    """Ingest's answers in the last minutes."""

    by_status: dict[str, int]
    four_xx: Annotated[Count, Field(alias="4xx")]
    four_xx_by_route: Annotated[
        dict[str, int], Field(alias="4xx_by_route", description="by `route:status`")
    ]


@with_config(_CLOSED)
class Recent(TypedDict):
    """The figures of the last minutes."""

    minutes: Count
    delivery_latency_s: Latency
    ingest_requests: IngestAnswers


@with_config(_CLOSED)
class StatusReport(TypedDict):
    """Queue depths, dead letters and rates: what `relay status --json` prints."""

    time: float
    depth: dict[str, int]
    messages: int
    oldest_age_s: Annotated[
        float, Field(description="age of the oldest undelivered event, whatever holds it")
    ]
    oldest_age_by_state_s: Annotated[
        dict[str, float], Field(description="ready, in_flight, delayed, identity_wait")
    ]
    paused_for_s: float
    redis_memory_fraction: float
    dead_letters: Annotated[dict[str, int], Field(description="by reason")]
    rates: dict[str, Rate]
    recent: Recent
    counters: dict[str, int]
    churnzero_problem: Annotated[Problem | None, Field(description="the newest problem")]
    churnzero_problems: list[Problem]
    names: dict[str, Any]
    replay: dict[str, int]
    learned_rate_rps: float | None
    parked: Annotated[
        dict[str, int],
        Field(description="`users` with traits parked for want of an account, and `traits`"),
    ]
    rate_limit_met: Annotated[bool, Field(description="whether a 429 has cut the rate yet")]
    archive: Annotated[
        dict[str, float],
        Field(
            description="the flight recorder: `entries` (settlements the archiver has not yet "
            "written) and `oldest_age_s`, with `archived` records and archiver `errors` so far"
        ),
    ]


@with_config(_OPEN)
class DeadLetter(TypedDict):
    """A dead-lettered event, with why and how its delivery failed."""

    id: str
    reason: Reason
    item: NotRequired[Annotated[Any, Field(description="the queued item: relay id, event")]]
    errors: NotRequired[list[Any]]
    status: NotRequired[Annotated[int | None, Field(description="ChurnZero's HTTP status")]]
    response: NotRequired[Annotated[str | None, Field(description="its answer, cut short")]]
    attempts: NotRequired[int]
    first_failure: NotRequired[float]
    last_failure: NotRequired[float]


@with_config(_CLOSED)
class DeadLetterPage(TypedDict):
    """A page of dead letters, newest first, and how many there are in all."""

    total: Count
    entries: list[DeadLetter]


_LEFT = Field(description="with a limit: the selected dead letters still there")


@with_config(_CLOSED)
class Replayed(TypedDict):
    """Dead letters sent through delivery again."""

    replayed: Count
    left: NotRequired[Annotated[int, Field(ge=0), _LEFT]]


@with_config(_CLOSED)
class Purged(TypedDict):
    """Dead letters deleted."""

    purged: Count
    left: NotRequired[Annotated[int, Field(ge=0), _LEFT]]


@with_config(_CLOSED)
class DryRunSummary(TypedDict):
    """What a bulk replay or purge of a selection would act on (nothing is changed)."""

    total: Count
    by_reason: dict[str, Count]
    by_event: Annotated[dict[str, Count], Field(description="a track's name, else the type")]
    outcomes: Annotated[dict[str, Count], Field(description="what a replay would do now")]


@with_config(_CLOSED)
class SearchHits(TypedDict):
    """Settled events of the archive (and those not yet archived) that match, newest first."""

    hits: Annotated[
        list[dict[str, Any]],
        Field(
            description="each the archive's columns (outcome, reason, ids, times), with `body`, "
            "`commands` and `tries` as JSON"
        ),
    ]


@with_config(_CLOSED)
class History(TypedDict):
    """Events ingested and delivered per `step_s` seconds over the last hour, oldest first."""

    end: Annotated[int, Field(description="unix second the last step ends at")]
    step_s: Count
    ingested: list[Count]
    delivered: list[Count]


@with_config(_CLOSED)
class Verdict(TypedDict):
    """What would become of one event now, and why."""

    index: Count
    type: str
    user: str
    outcome: Literal["deliver", "skip", "wait", "dead"]
    reason: str | None
    commands: Annotated[list[dict[str, Any]], Field(description="ChurnZero commands")]
    errors: list[Any]


@with_config(_CLOSED)
class Preview(TypedDict):
    """A verdict per event (nothing was sent or stored)."""

    events: list[Verdict]


@with_config(_OPEN)
class Sighting(TypedDict):
    """One place the event was found, with what that place knows about it."""

    state: Literal["queued", "in_flight", "delayed", "dead", "delivered", "skipped"]
    at: Annotated[float | None, Field(description="when it got there, or is due")]


@with_config(_CLOSED)
class Trace(TypedDict):
    """Every place the event was found."""

    found: list[Sighting]
