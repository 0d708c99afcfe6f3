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
