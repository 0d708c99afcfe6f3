"""Every Redis key the relay writes, in one place.

All start with `relay:` so the relay can share a Redis with other applications.
Celery's own keys (the `relay` queue list, `unacked`, `unacked_index`, ...) are
Celery's, named by the queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

PREFIX = "relay:"

# The Celery queue ingest publishes to and workers consume, and the replay lane's queue.
QUEUE = "relay"
REPLAY_QUEUE = "relay.replay"
TASK_DELIVER = "relay.deliver_batch"
# kombu's Redis transport keeps delivered-but-unacked messages here (read-only for us).
CELERY_UNACKED = "unacked"
# ... and indexes them by when they were handed to a worker (ZSET delivery tag -> time).
CELERY_UNACKED_INDEX = "unacked_index"

# ZSET of events waiting for a later try (member: packed JSON of a group of them with their
# cause and an id, score: due unix time).
DELAYED = PREFIX + "delayed"
# STRING per user ("u:<userId>" / "a:<anonymousId>") -> JSON [account, contact, at] (any
# may be null; at: event time in ms of the call that named the account); STRING per
# aliased key -> the user key it stands for; SET per user key of the delayed-set members
# holding that user's tracks waiting for identity.
IDENTITY = PREFIX + "identity:"
# Dedupe claims (relay/delivery/dedupe.py): per time bucket b, a meta HASH `relay:seen:<b>` and
# shard HASHes `relay:seen:<b>:<i>` (8-byte messageId digest -> 24-bit relay-id tag).
DEDUPE = PREFIX + "seen:"
ALIAS = PREFIX + "alias:"
WAITING = PREFIX + "waiting:"
# SET per user key of the keys aliased to it (so a delete finds them); STRING per
# deleted user key -> when the delete was received (events received before it are
# dropped when they come out of the queue, the delayed set or a replay).
ALIASED = PREFIX + "aliased:"
DELETED = PREFIX + "deleted:"

# HASH per ChurnZero entity (account, or contact within its account): attribute name ->
# event time (epoch ms) of the last value sent (relay.delivery.attribute_clock).
ATTRIBUTE_CLOCK = PREFIX + "attrclock:"

# The workers' leases (relay.state.lease): ZSET worker id -> lease deadline (ms on Redis's
# clock), and the last heartbeat of any worker (ms). Per worker: the LIST of messages it
# took off a queue and has not yet recorded as unacked, and the SET of delivery tags it
# holds in Celery's `unacked`.
WORKERS = PREFIX + "workers"
WORKERS_BEAT = PREFIX + "workers:beat"
WORKER = PREFIX + "worker:"

# Per Celery message (by task id): HASH of its run ("claimed", "settled", "d:<relay id>"
# per event delivered), and the lease of the run working on it now.
RUN = PREFIX + "run:"

# Dead letters: HASH id -> JSON entry, ZSET of ids by last failure, ZSET per reason.
DLQ_ENTRIES = PREFIX + "dlq:entries"
DLQ_INDEX = PREFIX + "dlq:index"
DLQ_REASON = PREFIX + "dlq:reason:"
# A replay's claim on one entry, and a replay's or purge's snapshot of an index.
DLQ_REPLAYING = PREFIX + "dlq:replaying:"
DLQ_SNAPSHOT = PREFIX + "dlq:snapshot:"

# ZSET per waiting state (`delayed`, `identity_wait`) of the delayed set's members: member
# id -> the oldest receipt time of its events (relay.delivery.delayed).
DELAYED_RECEIVED = PREFIX + "delayed:received:"

# Event counts by state, kept beside Celery's queue (which counts messages, not events).
DEPTH_READY = PREFIX + "depth:ready"
DEPTH_INFLIGHT = PREFIX + "depth:inflight"
DELAYED_EVENTS = PREFIX + "depth:delayed"

# Deployment-wide counters (HASH field -> int, the fields named by `Stat` below) so any
# ingest's /metrics shows them all.
STATS = PREFIX + "stats"
# Per-second delivered/ingested counts (a STRING per rate and second, kept an hour): the
# rates of `relay status` and the admin page's chart history.
RATE = PREFIX + "rate:"
# HASH per minute (unix time // 60) of the stats of the last minutes (relay.state.recent):
# delivery-latency buckets, ingest's answers by route and status.
MINUTE = PREFIX + "minute:"

# Shared throttle state: pause-until (unix ms), consecutive failures, probe lock, outage
# trips (how often the pause has doubled), GCRA.
PAUSE_UNTIL = PREFIX + "throttle:pause_until"
FAILURES = PREFIX + "throttle:failures"
PROBE = PREFIX + "throttle:probe"
TRIPS = PREFIX + "throttle:trips"
RATE_LIMIT = PREFIX + "throttle:gcra"
# HASH kind -> JSON {"kind", "problem", "at", ...}: the last answer that cannot have come
# from ChurnZero (a redirect, an HTML 200), or the last failure to reach its host (dns,
# tls, refused, connect_timeout), kept a while so status shows why delivery is paused.
CHURNZERO_PROBLEMS = PREFIX + "churnzero:problems"

# The replay lane: its own GCRA, and flags (2 s) saying a lane reserved a slot lately.
RATE_LIMIT_REPLAY = PREFIX + "throttle:gcra:replay"
LANE_LIVE = PREFIX + "throttle:lane:live"
LANE_REPLAY = PREFIX + "throttle:lane:replay"
# The self-tuning rate: HASH of the learned rate and the recent 2xx counts.
ADAPTIVE_RATE = PREFIX + "throttle:adaptive"

# The record of recent settlements `relay trace` reads: a STREAM of about trace_size events,
# one entry per settlement holding each event delivered (with its commands), skipped or
# dead-lettered.
TRACE = PREFIX + "trace"
# STREAM of settled events' records (relay.state.archive) that the archiver has not yet
# written to the archive's files: one entry per settlement.
ARCHIVE = PREFIX + "archive"
# A replay of a slice of the archive (relay.archive.replay): HASH of its time range,
# cursor and counts, per replay id; expires a week after its last step.
ARCHIVE_REPLAY = PREFIX + "archive:replay:"
# The archivers' consumer group on it (not a key: a name inside the stream).
ARCHIVE_GROUP = "archivers"
# The lock of one day's consolidation (relay.archive.maintenance), per `YYYY-MM-DD`: a
# STRING (redis-py's Lock token) with a TTL, so that one archiver at a time merges a day.
ARCHIVE_CONSOLIDATING = PREFIX + "archive:consolidating:"

# The new-name guard (relay.state.names): a SET per kind of the names sent to ChurnZero, a ZSET
# of the newest new names ("kind:name" -> first sent) and one of the names held.
NAMES = PREFIX + "names:known:"
NAMES_NEW = PREFIX + "names:new"
NAMES_HELD = PREFIX + "names:held"

# Parked traits (relay.state.parking): a HASH per user key (trait -> "<event ms>|<JSON
# value>"), a ZSET of those users by expiry, and the number of traits parked now.
PARKED = PREFIX + "parked:"
PARKING_INDEX = PREFIX + "parking:index"
PARKING_TRAITS = PREFIX + "parking:traits"
# SET of users parked after they got an account (a race), for the sweep to release.
PARKING_KNOWN = PREFIX + "parking:known"

# Embedded-Redis ownership (a lock file, not a key) lives in the state dir.


@dataclass(frozen=True, slots=True)
class Family:
    """Keys of one kind, one per name: `keys.identity("u:42")` is that user's entry; the
    family's `prefix` (the constant beside it) matches them all in a SCAN."""

    prefix: str
    suffix: str = ""

    def __call__(self, name: str) -> str:
        return self.prefix + name + self.suffix


# The per-reason index of dead letters.
dlq_reason = Family(DLQ_REASON)
# The identity-map entry of one user key (`u:<userId>` or `a:<anonymousId>`).
identity = Family(IDENTITY)
# The names of one kind (event, account_attribute, contact_attribute) sent so far.
names = Family(NAMES)
# The alias link of one user key: the user key it now stands for.
alias = Family(ALIAS)
# The keys aliased to one user key.
aliased = Family(ALIASED)
# The tombstone of a deleted user key (value: when the delete was received).
deleted = Family(DELETED)
# The index of one user's tracks waiting in the delayed set for identity.
waiting = Family(WAITING)
# The oldest receipt time of each delayed member of one waiting state.
delayed_received = Family(DELAYED_RECEIVED)
# The attribute clock of one entity (`a:<account>` or `c:<len>:<account>:<contact>`).
attribute_clock = Family(ATTRIBUTE_CLOCK)
# The parked traits of one user key.
parked = Family(PARKED)
# The stats of one minute (unix time // 60).
minute = Family(MINUTE)
# What one worker process took off a queue and has not recorded yet, and what it holds.
worker_taken = Family(WORKER, ":taken")
worker_held = Family(WORKER, ":held")
# The run record of one Celery message, and the lease of the run working on it now.
run = Family(RUN)
run_lock = Family(RUN, ":lock")


class Stat(StrEnum):
    """The counters in the `STATS` hash. A labelled one is a field per label
    (`Stat.SKIPPED.of("duplicate")` is `skipped:duplicate`)."""

    DELIVERED = "delivered"
    REPLAY_DELIVERED = "replay_delivered"  # of them, events of the replay lane
    SKIPPED = "skipped"  # :<reason>
    REQUESTS = "requests"  # :<outcome>, requests to ChurnZero
    RETRIED = "retried"  # :<cause>
    ATTRIBUTES = "attributes"  # :<reason>, attribute writes not sent
    DEAD_LETTERS = "dead_letters"  # :<reason>
    REPLAYED = "replayed"
    NEW_NAMES = "new_names"  # :<kind>
    CONTACT_CHANGES = "contact_changes"  # users an explicit contact id moved
    PARKED = "parked"  # :<outcome> parked traits: parked, released, expired, deleted
    RATELIMIT_WAITS = "ratelimit_waits"
    # Events sent again after a request whose fate is unknown: ChurnZero may have taken
    # it (:<cause>, the request's outcome label: timeout, connection_error, deadline).
    RESENT = "resent"
    # Settlements run as a plain MULTI, which Redis refuses at maxmemory (relay.state.oom).
    OOM_FALLBACKS = "oom_fallbacks"
    REPLICATION_WAITS = "replication_waits"
    # The flight recorder: records written to the archive's files, and the archiver's
    # failures (:<what>: redis, or store: its files' directory or bucket, or a record).
    ARCHIVED = "archived"
    ARCHIVER_ERRORS = "archiver_errors"
    # The ChurnZero request-duration histogram: count per bucket (:<upper bound>), total
    # count and sum in microseconds.
    REQUEST_SECONDS_BUCKET = "request_seconds_bucket"
    REQUEST_SECONDS_COUNT = "request_seconds_count"
    REQUEST_SECONDS_SUM_US = "request_seconds_sum_us"
    # The delivery-latency histogram (receipt to ChurnZero's 2xx, per live event): count
    # per bucket (:<upper bound>), total count and sum in milliseconds.
    LATENCY_BUCKET = "delivery_latency_bucket"
    LATENCY_COUNT = "delivery_latency_count"
    LATENCY_SUM_MS = "delivery_latency_sum_ms"
    # Ingest's request stats, every ingest process's (relay.ingest.metrics): requests
    # :<route>:<status>, events :<route>:<outcome>, timestamp fallbacks :<route>, and the
    # request-duration histogram: count per bucket :<route>:<upper bound>, sum in µs
    # :<route>.
    INGEST_REQUESTS = "ingest_requests"
    INGEST_EVENTS = "ingest_events"
    INGEST_TIMESTAMP_FALLBACKS = "ingest_timestamp_fallbacks"
    INGEST_SECONDS_BUCKET = "ingest_seconds_bucket"
    INGEST_SECONDS_SUM_US = "ingest_seconds_sum_us"

    def of(self, label: str) -> str:
        """The field of this counter for one label."""
        return f"{self.value}:{label}"
