"""The workers' unacked bookkeeping (kombu's ack emulation) for relay.state.transport.

A message a worker takes is recorded in Celery's `unacked` hash and index and in the
worker's held set (relay.state.lease) in one script, acked and restored the same way,
even at maxmemory; see relay.state.transport for why.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay import keys
from relay.state import lease

log = structlog.get_logger("relay.transport")

# Longer than a failover (down-after-milliseconds plus the election): the message waits in
# the worker's taken list meanwhile, and recording it once a primary answers spares a
# redelivery; the consumer would wait anyway with no primary to poll.
RECORD_PATIENCE_S = 60.0
_RETRY_EVERY_S = 0.25


# KEYS: unacked index, unacked hash, own taken list, own held set. ARGV: delivery tag,
# payload (kombu's record), the message as taken ("" if it was not taken into the list).
# Scored on Redis's clock, as the sweep reads it: hosts' clocks do not matter.
_APPEND = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[3] ~= '' then redis.call('LREM', KEYS[3], 1, ARGV[3]) end
return 0
"""
# KEYS: unacked index, unacked hash, own held set. ARGV: delivery tag. (kombu runs these
# in MULTI, and Redis refuses every command queued in a MULTI at maxmemory, even deletions.)
_REMOVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 0
"""


class QoS(kombu_redis.QoS):
    """kombu's ack emulation; unacked bookkeeping and restores survive a full Redis, and
    what a worker holds is in its held set (relay.state.lease)."""

    _next_sweep = 0.0

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as unacked, even at maxmemory, waiting out a
        failover (the message stays in the worker's taken list meanwhile)."""
        deadline = time.monotonic() + RECORD_PATIENCE_S
        waited = False
        while True:
            try:
                self._append(message, delivery_tag)
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise
                if not waited:
                    log.warning("unacked_record_waits", error=type(exc).__name__)
                waited = True
                time.sleep(_RETRY_EVERY_S)

    def _append(self, message: Any, delivery_tag: str) -> None:
        channel: Any = self.channel
        if not channel.takes:
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        # kombu's record ([message, exchange, routing key]), as kombu reads it back; its
        # own encoder escapes every byte of the message's base64 body in Python's JSON.
        payload = orjson.dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        client = channel.lease_client
        client.eval(channel.script_header + _APPEND, 4, self.unacked_index_key,
                    self.unacked_key, lease.taken_key(), lease.held_key(), delivery_tag,
                    payload, channel.taken or b"")  # fmt: skip
        channel.taken = None
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Forget an acknowledged message, even at maxmemory."""
        self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Requeue a message; one Celery gives up on stays unacked, for redelivery."""
        if requeue:
            try:
                self.restore_by_tag(delivery_tag, leftmost=True)
            except (OutOfMemoryError, ExecAbortError):
                # One transaction: the message is still in unacked, and restore_visible
                # brings it back after the visibility timeout.
                log.warning("requeue_deferred", error="redis at maxmemory")
        else:
            # The relay's task settles every event itself (delivered, retried, dead-
            # lettered); Celery rejects without requeue only when it gave up for want of
            # Redis (a retry it could not publish, retries exhausted). Deleting the
            # message would lose acknowledged events: it comes back after the
            # visibility timeout instead.
            log.warning("reject_kept_for_redelivery", delivery_tag=delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """When the channel closes (shutdown, a lost connection), requeue what this worker
        held and took; what cannot be requeued now is put back when it consumes again,
        or by another worker once its lease lapses."""
        try:
            channel: Any = self.channel
            if channel.takes and channel.enlisted:
                channel.reclaim()
            super().restore_unacked(client)
        except (OutOfMemoryError, ExecAbortError):
            log.warning("restore_unacked_deferred", error="redis at maxmemory")
        except (AttributeError, RedisError, OSError) as exc:
            # kombu 5.7 closing a channel whose connection is gone fails to make a client
            # (AttributeError in `_connparams`) and the worker would stop for good.
            log.warning("restore_unacked_deferred", error=type(exc).__name__)

    def _remove(self, delivery_tag: str) -> None:
        channel: Any = self.channel
        if not channel.takes:
            self._remove_from_indices(delivery_tag).execute()
            return
        channel.lease_client.eval(channel.script_header + _REMOVE, 3, self.unacked_index_key,
                                  self.unacked_key, lease.held_key(), delivery_tag)  # fmt: skip

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # Also kombu's restores (a requeue, a restore at close): the worker holds it no more.
        return super()._remove_from_indices(delivery_tag, pipe).srem(lease.held_key(), delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """Every quarter lease: put back what lapsed workers took and held, and requeue
        messages past the visibility timeout; at maxmemory, try again later."""
        channel: Any = self.channel
        try:
            if not channel.takes:
                super().restore_visible(start=start, num=num, interval=interval)
                return
            now = time.monotonic()
            if now < self._next_sweep:
                return
            self._next_sweep = now + channel.worker_lease / 4
            client = channel.lease_client
            tags = lease.sweep(
                client, channel.worker_lease, unacked_index=self.unacked_index_key,
                visibility_s=self.visibility_timeout, limit=num or 100,
                fallback_queue=keys.QUEUE,
            )  # fmt: skip
            for tag in tags:
                self.restore_by_tag(bytes_to_str(tag), client)
            if tags:
                log.info("restored_unacked", messages=len(tags))
        except (OutOfMemoryError, ExecAbortError):
            # The sweep or a requeue was refused: a requeue is one transaction, and what
            # stays unacked is requeued after the visibility timeout at the latest.
            log.warning("restore_visible_deferred", error="redis at maxmemory")
