"""The workers' Celery consumer: a message no worker can run is dead-lettered, not lost.

Celery acks and drops a message whose body it cannot decode, and rejects one for a task it
does not know; the relay's transport keeps a rejected message for redelivery, so such a
message would come back after every visibility timeout, forever. Here each is stored in
the dead-letter queue (`undecodable_message`, `unknown_task`) with the message as
received, and acked only once stored.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery.worker.consumer import Consumer as CeleryConsumer

from relay.reasons import Reason
from relay.state import broker, deadletter
from workers.app import state

log = structlog.get_logger("relay.worker")


class Consumer(CeleryConsumer):
    """Celery's consumer, dead-lettering what it would drop or reject."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A body Celery cannot decode."""
        dead_letter(message, Reason.UNDECODABLE_MESSAGE, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message whose fields Celery cannot read."""
        dead_letter(message, Reason.UNDECODABLE_MESSAGE, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A message for a task the relay does not have."""
        dead_letter(message, Reason.UNKNOWN_TASK, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message that is no Celery task at all."""
        dead_letter(message, Reason.UNKNOWN_TASK, ValueError("not a Celery task message"))


def dead_letter(message: Any, reason: Reason, exc: Exception) -> None:
    """Store the message as received in the dead-letter queue, then ack it; if Redis
    refuses, leave it unacked (it comes back)."""
    raw = getattr(message, "_raw", None)
    item = raw if isinstance(raw, dict) else {"body": repr(getattr(message, "body", None))}
    entry = deadletter.new_entry(
        item, reason, errors=[f"{type(exc).__name__}: {exc}"[:500]],
        entry_id=deadletter.entry_id_of(item),
    )  # fmt: skip
    headers = getattr(message, "headers", None) or {}
    try:
        deadletter.add(state, [entry])
    except broker.QUEUE_ERRORS as error:
        log.warning("message_not_dead_lettered", reason=reason.value, error=type(error).__name__)
        message.reject(requeue=False)  # kept unacked by relay.state.transport
        return
    message.ack()
    log.warning("message_dead_lettered", reason=reason.value, task=headers.get("task"),
                task_id=headers.get("id"), entry=entry.id)  # fmt: skip
