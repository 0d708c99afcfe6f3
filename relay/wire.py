"""`relay.deliver_batch` messages as Celery writes them to Redis: encoded here, pushed by
relay.state.broker.

`celery.send_task` does per message, in Python, what a group needs once (routing,
`saferepr` of the arguments, kombu's frame, one LPUSH each); here a group's messages
are encoded with orjson, and relay.state.broker pushes them with their counts in one script
call. Each is a Celery protocol 2 message in kombu's Redis frame (base64 body, a
delivery tag), the same shape `broker.send` makes through Celery, so `relay worker`
consumes it unchanged (tests/integration/test_wire.py runs the real worker on them).

The body is zlib-compressed, as Celery's own `compression="zlib"` publishes it (kombu's
`compression` header; any Celery consumer inflates it before decoding). A batch of
events repeats its keys and context in every event, so it shrinks many times over, and
with it what Redis receives, keeps and writes to its AOF for every event: Redis's work
per queued event grows with the message's size. Messages without the header (as earlier
versions wrote them) are read as plain JSON.

The compressing is ISA-L's (`isal`): the same zlib format, which any zlib inflates, for
less CPU than the standard library's zlib spends on the same batch.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
import zlib
from typing import Any

import orjson
import pybase64
from isal import isal_zlib

from relay import keys
from relay.envelope import Json

# Celery's protocol 2 body is [args, kwargs, embed]; a relay task has no links.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# kombu's name of zlib (`compression="zlib"` in Celery). ISA-L's level 1: on event
# batches it shrinks as much as zlib's default level.
COMPRESSION = "application/x-gzip"
ZLIB_LEVEL = 1


class MessageWriter:
    """Encodes item groups as Celery messages of the `relay.deliver_batch` task."""

    def __init__(self) -> None:
        # Ids unique per process by a random prefix, then a counter: a uuid4 per message
        # would cost a system call each. Celery accepts any string as a task id.
        self._prefix = os.urandom(8).hex()
        self._count = 0
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())

    def _next(self) -> str:
        self._count += 1
        return f"{self._prefix}-{self._count:x}"

    def encode(
        self, items: list[Json], task_id: str | None = None, queue: str = keys.QUEUE
    ) -> bytes:
        """One message for `queue` carrying `items` as the task's only argument."""
        task_id = task_id or self._next()
        body = isal_zlib.compress(orjson.dumps([[items], {}, _EMBED]), ZLIB_LEVEL)
        frame = {
            # pybase64: the same text as the standard library's, from a SIMD encoder.
            "body": pybase64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": keys.TASK_DELIVER,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                # Celery logs this; a summary, not a repr of hundreds of events.
                "argsrepr": f"[<{len(items)} events>]",
                "kwargsrepr": "{}",
                "origin": self._origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
                "compression": COMPRESSION,
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self._reply_to,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                # kombu keys its unacked hash by this: unique per message.
                "delivery_tag": self._next(),
            },
        }
        return orjson.dumps(frame)

    def encode_all(
        self,
        items: list[Json],
        message_events: int,
        message_id: str | None = None,
        queue: str = keys.QUEUE,
    ) -> list[bytes]:
        """`items` split into messages of at most `message_events`, in order.

        With a `message_id` the task ids are `<message_id>.<n>`: publishing the same items
        again makes the same messages, which the workers settle once (relay.delivery.claims)."""
        return [
            self.encode(
                items[start : start + message_events],
                f"{message_id}.{n}" if message_id else None,
                queue,
            )
            for n, start in enumerate(range(0, len(items), message_events))
        ]


def body_of(frame: Any) -> bytes:
    """The Celery body of a message's kombu frame (parsed from JSON): base64-decoded
    and inflated as its properties and headers say; ValueError (or KeyError, TypeError)
    if it is not one."""
    body = frame["body"]
    if frame.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    elif isinstance(body, str):
        body = body.encode()
    compression = (frame.get("headers") or {}).get("compression")
    if compression:
        if compression not in (COMPRESSION, "gzip", "zlib"):
            raise ValueError(f"unsupported compression: {compression}")
        try:
            body = zlib.decompress(body)
        except zlib.error as exc:
            raise ValueError(f"body does not inflate: {exc}") from None
    return bytes(body)


def items_of(frame: Any) -> list[Json]:
    """The items of a `relay.deliver_batch` message, its kombu frame parsed from JSON;
    ValueError (or KeyError, IndexError, TypeError) if it is not one."""
    args, _kwargs, _embed = orjson.loads(body_of(frame))
    items: list[Json] = args[0]
    return items


def pack(data: Any) -> bytes:
    """`data` as JSON, compressed as a queued message's body is: how a batch waiting in
    Redis outside the queue (the delayed set) is stored, so that moving it there from
    the queue does not grow Redis."""
    return bytes(isal_zlib.compress(orjson.dumps(data), ZLIB_LEVEL))


def unpack(raw: bytes) -> Any:
    """What `pack` stored; ValueError if it is not that (see `unpack_text`)."""
    return orjson.loads(unpack_text(raw))


def unpack_text(raw: bytes) -> bytes:
    """The JSON text `pack` stored (or `raw` itself when plain JSON, as batches written
    before were); ValueError if it does not inflate."""
    if raw[:1] == b"{":
        return raw
    try:
        return zlib.decompress(raw)
    except zlib.error as exc:
        raise ValueError(f"does not inflate: {exc}") from None
