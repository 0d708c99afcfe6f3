"""The queue item: one Segment event in the envelope that carries it between processes.

Ingest, the delayed-set mover and `relay dlq replay` queue envelopes; workers take them,
maybe after either side was upgraded, so the JSON form is a contract between versions:

    {"id", "source", "received_at", "attempts", "event",
     "first_seen"?, "first_failure"?, "replayed_from"?, "tries"?}

- `id`: the relay's id of this copy of the event (dedupe, run records and outcomes go
  by it);
- `source`: the route that took it, `api` or `webhook` (`integrations.All` applies on
  `api` only), or `operator` (`relay identities forget`); a `delete` from `api` is never
  honoured;
- `received_at`: when ingest took it (unix time); the max age counts from it;
- `attempts`: failed tries, or waits for the user's identity, so far;
- `event`: the Segment event as ingest accepted it; the worker parses it (relay.events);
- `first_seen`: when a worker first found the track without its user (the identity wait
  counts from it);
- `first_failure`: the first failed try;
- `replayed_from`: the dead-letter entry a replay took it from (the replay lane);
- `tries`: the newest failed tries (at most `TRIES_KEPT`), oldest first, each
  `{"at": unix time, "status": HTTP status or null, "error": text or null}`: what the
  flight recorder keeps of the event's journey (relay.archive.schema).

An absent or null optional field reads as None, and None is never written, so a worker of
an earlier version reads what this one writes. Keys this version does not know are
ignored. Whatever else fails to read raises `DecodeError`, naming the field.

A Celery message carries a batch of envelopes' JSON (relay.wire writes and reads the
message). Ingest writes new envelopes' JSON directly (`fresh`): at tens of thousands of
events a second an object per event costs more than the dict it becomes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from relay.errors import DecodeError

Json = dict[str, Any]  # an envelope's JSON object, as queued
_OPTIONAL = ("first_seen", "first_failure", "replayed_from", "tries")
TRIES_KEPT = 10  # an event retried for days carries its newest tries, not all of them
Try = dict[str, Any]  # {"at", "status", "error"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One queued event and what the relay knows of its journey (see the module docstring)."""

    id: str
    source: str
    received_at: float | None
    attempts: int = 0
    event: dict[str, Any]
    first_seen: float | None = None
    first_failure: float | None = None
    replayed_from: str | None = None
    tries: tuple[Try, ...] | None = None

    @classmethod
    def new(
        cls, event: dict[str, Any], *, source: str, received_at: float, rid: str | None = None
    ) -> Envelope:
        """A newly accepted event (a random relay id unless `rid`)."""
        return cls(id=rid or uuid.uuid4().hex, source=source, received_at=received_at, event=event)

    def attempted(
        self, now: float, status: int | None = None, error: str | None = None
    ) -> Envelope:
        """The envelope after one more failed try at delivery (answered `status`, or no
        answer for `error`)."""
        tried = {"at": now, "status": status, "error": error}
        return replace(
            self, attempts=self.attempts + 1, first_failure=self.first_failure or now,
            tries=(*(self.tries or ())[-(TRIES_KEPT - 1) :], tried),
        )  # fmt: skip

    def replayed(self, entry_id: str, now: float) -> Envelope:
        """The envelope a replay of dead-letter entry `entry_id` queues: a fresh start
        (attempts, max age and identity wait count from the replay)."""
        return replace(
            self, received_at=now, attempts=0, first_seen=None, first_failure=None,
            replayed_from=entry_id, tries=None,
        )  # fmt: skip

    @property
    def message_id(self) -> str | None:
        """The event's Segment messageId, if it has one."""
        found = self.event.get("messageId")
        return found if isinstance(found, str) and found else None

    def to_dict(self) -> Json:
        """The JSON object, keys in the order ingest writes them, None left out."""
        out: Json = {"id": self.id, "source": self.source}
        if self.received_at is not None:
            out["received_at"] = self.received_at
        out["attempts"] = self.attempts
        out["event"] = self.event
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "tries" else value
        return out

    def to_json(self) -> bytes:
        """The JSON text."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Envelope:
        """The envelope of a queued JSON object; raises DecodeError if it is not one."""
        if not isinstance(data, dict):
            raise DecodeError(f"an envelope is a JSON object, not {type(data).__name__}")
        rid = data.get("id")
        if not isinstance(rid, str) or not rid:
            raise DecodeError(f"no relay id: id is {rid!r}")
        event = data.get("event")
        if not isinstance(event, dict):
            raise DecodeError(f"{rid}: event is not a JSON object but {type(event).__name__}")
        source = data.get("source", "api")
        attempts = data.get("attempts", 0)
        replayed_from = data.get("replayed_from")
        if not isinstance(source, str):
            raise DecodeError(f"{rid}: source is {source!r}")
        if not isinstance(attempts, int) or isinstance(attempts, bool):
            raise DecodeError(f"{rid}: attempts is {attempts!r}")
        if replayed_from is not None and not isinstance(replayed_from, str):
            raise DecodeError(f"{rid}: replayed_from is {replayed_from!r}")
        tries = data.get("tries")
        if tries is not None and not (
            isinstance(tries, list) and all(isinstance(t, dict) for t in tries)
        ):
            raise DecodeError(f"{rid}: tries is {tries!r}")
        return cls(
            id=rid, source=source, received_at=_time(data, "received_at"), attempts=attempts,
            event=event, first_seen=_time(data, "first_seen"),
            first_failure=_time(data, "first_failure"), replayed_from=replayed_from,
            tries=tuple(tries) if tries is not None else None,
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        """The envelope of its JSON text; raises DecodeError if it is not one."""
        return cls.from_dict(_loads(raw))


def _loads(raw: bytes | str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None


def _time(data: Json, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise DecodeError(f"{data['id']}: {key} is {value!r}")


def decode_all(items: Iterable[Any]) -> tuple[list[Envelope], list[tuple[Any, DecodeError]]]:
    """The envelopes among a message's items, and each item that is none, with why."""
    envelopes, failed = [], []
    for item in items:
        try:
            envelopes.append(Envelope.from_dict(item))
        except DecodeError as exc:
            failed.append((item, exc))
    return envelopes, failed


def fresh(
    events: Iterable[Any], source: str, received_at: float, new_id: Callable[[], str]
) -> list[Json]:
    """New envelopes' JSON, as `Envelope.new(...).to_dict()` makes it: ingest's hot path."""
    return [
        {"id": new_id(), "source": source, "received_at": received_at, "attempts": 0, "event": e}
        for e in events
    ]
