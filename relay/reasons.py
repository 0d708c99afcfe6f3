"""Why an event is a dead letter: one name per way an event can fail for good.

The values are stored in every dead-letter entry, name a Redis index per reason and label
metrics, so a value once written is never renamed (entries of earlier versions must still
be read). A member is a `str`, but orjson takes only a plain `str` as a dict key: count
reasons by `reason.value`.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A dead letter's reason (docs/operations.md says what each one asks of an operator)."""

    INVALID_EVENT = "invalid_event"  # failed validation at ingest
    INVALID_COMMAND = "invalid_command"  # its commands are ones ChurnZero would drop
    UNRESOLVED_IDENTITY = "unresolved_identity"  # no account learned in the identity wait
    REJECTED = "rejected"  # ChurnZero answered a non-retryable 4xx
    RETRIES_EXHAUSTED = "retries_exhausted"  # still failing at the maximum age
    WORKER_ERROR = "worker_error"  # the worker could not handle its batch at all
    NEW_NAME = "new_name"  # held by the new-name guard until `relay names allow`
    NO_CONTACT = "no_contact"  # an account-level call naming no person, no account_contact
    UNDECODABLE_MESSAGE = "undecodable_message"  # a queue entry no worker can read
    UNKNOWN_TASK = "unknown_task"  # a Celery message for a task the relay does not have


class Skip(StrEnum):
    """Why an event is not delivered though nothing failed: a `relay_skipped_events` label,
    a `skipped:<reason>` stats field and the reason a trace records, so never renamed."""

    UNSUPPORTED_TYPE = "unsupported_type"  # a call type ChurnZero has no use for
    DELETE_REFUSED = "delete_refused"  # a delete from the tracking API, never applied
    DISABLED_BY_INTEGRATIONS = "disabled_by_integrations"  # `ChurnZero: false` or `All: false`
    FILTERED_BY_MAPPING = "filtered_by_mapping"  # a track the mapping does not want
    DELETE_REQUEST = "delete_request"  # a delete, applied to the identity map only
    NOTHING_TO_SEND = "nothing_to_send"  # every command of the event was dropped
    PARKED = "parked"  # traits kept until the user's account is known
    DUPLICATE = "duplicate"  # another copy of the event was delivered or claimed
    STALE_ATTRIBUTE = "stale_attribute"  # every write older than its attribute clock


class Deferral(StrEnum):
    """Why events wait in the delayed set: a `retried:<cause>` stats field, a metric label
    and the cause stored with the delayed batch, so never renamed. A request's outcome
    label (`retry.Outcome.label`: `429`, `5xx`, `timeout`, ...) is a cause too."""

    PAUSED = "paused"  # the throttle paused sending, or the rate left no slot in time
    DEADLINE = "deadline"  # the task's time limit came before the send
    REPLAY_SHARE = "replay_share"  # the replay lane's rate share left no slot in time
    IDENTITY_WAIT = "identity_wait"  # a track waiting for its user's account
    PARKED = "parked"  # released parked traits, sent as identify calls
    TIMEOUT = "timeout"  # no answer before the client's timeout
    CONNECTION_ERROR = "connection_error"  # the connection failed or was lost
    MISCONFIGURED = "misconfigured"  # the ChurnZero URL or key is wrong
