"""kombu's Redis transport for the workers: no take that lives only in a socket, and a
worker that can start and drain a full Redis.

**Taking a message.** Stock kombu pops a message with BRPOP and records it as unacked
afterwards: an answer lost on the wire, or a worker that dies in between, leaves it in no
Redis structure. Here one command moves it into the worker's own taken list (BLMOVE, or
BRPOPLPUSH before Redis 7; the take script when a worker reads several queues, as a
blocking move has one source), and one script then records it as unacked, adds its tag to
the worker's held set and removes it from the taken list. The worker's lease
(relay.state.lease) covers both: what a worker took but never recorded goes back on the
queue when its channel opens again or closes (`reclaim`), or by another worker's sweep
once its lease lapses, and so does what it held. A queue entry that is not a kombu
message is dead-lettered (`undecodable_message`) out of the taken list.

**A full Redis.** At `maxmemory` with `noeviction` Redis refuses every command that may
grow memory, BLMOVE included, and every command queued in a MULTI, even a deletion.
Everything a worker writes here moves work already in Redis (queue to taken list to
unacked) or is a few bytes of bookkeeping, while each acknowledged message frees its
whole body: draining only ever shrinks Redis. So the writes run as scripts flagged
`allow-oom` (Redis 7+), which Redis lets write at maxmemory, as do the worker's other
writes (its settlements, relay.state.oom; the delayed-set mover's publishes,
relay.state.broker); a refused BLMOVE gives way to the take script for a while. New events
come in only through ingest, which stays on stock kombu and its admission check refuses them well
before maxmemory (`RELAY_MAX_MEMORY_FRACTION`), so nothing else overshoots. On servers
before 7 (no script flags) the same scripts run unflagged.

When Celery gives up on a task (its retry could not be published, or its retries ran
out) it rejects the message without requeue, and kombu would delete it: events lost. Here
such a message stays unacked and is redelivered after the visibility timeout.

Celery acknowledges a task's message after its consumer may have closed the channel to
reconnect; kombu then fails with an AttributeError that stops the whole worker. Here a
closed channel says so with a connection error, which Celery logs, and the message stays
unacked and comes back.

`install()` points kombu's `redis://`, `rediss://` and `sentinel://` schemes at these
classes in the worker's process: kombu picks a transport by URL scheme, also when it
fails over to the next sentinel URL, so a Celery setting could not reach every connection.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

import structlog
from kombu.transport import TRANSPORT_ALIASES, get_transport_cls
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError

from relay import keys
from relay.reasons import Reason
from relay.state import deadletter, lease
from relay.state.oom import ALLOW_OOM, script_flags
from relay.state.unacked import QoS

log = structlog.get_logger("relay.transport")
# KEYS: the queues in the consumer's order, then its taken list. Moves the first message
# found into the taken list and returns {its queue's position, the message}.
_TAKE = """
for i = 1, #KEYS - 1 do
  local m = redis.call('RPOPLPUSH', KEYS[i], KEYS[#KEYS])
  if m then return {i, m} end
end
return false
"""
# KEYS: the exchange's binding table and its permanent twin. ARGV: the member.
_BIND = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 0
"""
# After a take refused at maxmemory, take by script (allowed there) for this long; when
# even that finds or may take nothing, wait this long before the next try.
_OOM_SCRIPT_S = 5.0
_REFUSED_PAUSE_S = 1.0
# A worker reading several queues blocks on the first one at most this long: a message of
# another waits no longer for it.
_SEVERAL_QUEUES_WAIT_S = 0.2


class _ClosedAware:
    """A closed channel says so with a connection error (see the module docstring)."""

    connection: Any

    def _get_pool(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the channel's broker connection is closed")
        return super()._get_pool(asynchronous)


class _AllowOom(kombu_redis.Channel):
    """kombu's Redis channel: takes a message into the worker's taken list (BLMOVE), with
    the QoS above and bindings that survive a full Redis."""

    QoS = QoS
    # How long a worker's hold on what it took outlives its last heartbeat
    # (relay.state.lease); `worker_lease` in the transport options.
    worker_lease = 8.0
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "worker_lease")

    _allow_oom: bool | None = None
    _lease_client: Any = None
    taken: bytes | None = None  # the message being delivered, as taken
    enlisted = False
    _taking: tuple[str, list[str]] = ("", [])
    _block_next = True
    _oom_until = 0.0
    _paused_until = 0.0
    _take_unread = False  # a take was sent and its answer not read

    @property
    def takes(self) -> bool:
        """Whether this channel takes messages into the worker's taken list (always, but
        with a global key prefix, where kombu's own BRPOP applies)."""
        return not self.global_keyprefix

    @property
    def allow_oom(self) -> bool:
        """Whether writes go through allow-oom scripts (Redis 7+, no key prefix)."""
        if self._allow_oom is None:
            self._allow_oom = not self.global_keyprefix and script_flags(self.lease_client)
        return self._allow_oom

    @property
    def script_header(self) -> str:
        """The flags line of this channel's scripts."""
        return ALLOW_OOM if self.allow_oom else ""

    @property
    def lease_client(self) -> Any:
        """A client of the shared pool, not `self.client`, whose connection may be
        waiting on a take; kept, so its server's flags are asked once."""
        if self._lease_client is None:
            with self.conn_or_acquire() as client:
                self._lease_client = client
        return self._lease_client

    def reclaim(self) -> None:
        """Renew the worker's lease, put back what it took and never recorded, and
        requeue what it still holds (a closed connection could not)."""
        for tag in lease.enlist(self.lease_client, self.worker_lease, keys.QUEUE):
            self.qos.restore_by_tag(bytes_to_str(tag), self.lease_client)

    def _brpop_start(self, timeout: int | None = None) -> None:
        if not self.takes:
            super()._brpop_start(timeout)
            return
        now = time.monotonic()
        if now < self._paused_until:
            return
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        try:
            if not self.enlisted:
                self.reclaim()
                lease.heartbeat(self.worker_lease).keep(self, self.lease_client)
                self.enlisted = True
                log.info("consuming", worker=lease.worker_id(), lease_s=self.worker_lease)
            elif self._take_unread:
                # The last take's answer never came (its connection dropped, or kombu's
                # health check dropped it): what it moved is back on the queue now.
                lease.enlist(self.lease_client, self.worker_lease, keys.QUEUE)
        except OutOfMemoryError:
            # Redis before 7 at maxmemory: no take until the worker holds its lease.
            log.warning("enlist_refused", error="redis at maxmemory")
            self._paused_until = now + _REFUSED_PAUSE_S
            return
        self._take_unread = False
        sources = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        timeout = self.brpop_timeout if timeout is None else timeout
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = now
        taken = lease.taken_key()
        if now >= self._oom_until and (len(sources) == 1 or self._block_next):
            # One command takes and records the take: what Redis pops is in the taken
            # list, whether or not the reply reaches this worker. It waits on one queue:
            # with several, briefly, then the take script looks at them all again.
            if len(sources) > 1:
                timeout = min(timeout, _SEVERAL_QUEUES_WAIT_S)
            if self.allow_oom:
                args = ["BLMOVE", sources[0], taken, "RIGHT", "LEFT", timeout or 0]
            else:  # servers before 7 may predate BLMOVE (6.2); the same move
                args = ["BRPOPLPUSH", sources[0], taken, timeout or 0]
            self._taking = (str(args[0]), sources[:1])
        else:
            # Several queues, in order, without blocking (a blocking move has one source);
            # also the take at maxmemory, where Redis refuses BLMOVE but not this script.
            args = ["EVAL", self.script_header + _TAKE, len(sources) + 1, *sources, taken]
            self._taking = ("EVAL", sources)
        connection.send_command(*args)
        self._take_unread = True

    def _brpop_read(self, **options: Any) -> bool:
        if not self.takes:
            return bool(super()._brpop_read(**options))
        command, sources = self._taking
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
                self._take_unread = False
            except self.connection_errors:
                # Disconnect so that the next iteration reconnects; what was taken stays
                # in the taken list and is put back (`reclaim`, or a lapsed lease's sweep).
                self.client.connection.disconnect()
                raise
            except OutOfMemoryError:
                self._take_unread = False  # an answer: the take did not happen
                self._refused(command)
                raise Empty() from None
            if command == "EVAL":
                item, source = (reply[1], sources[int(reply[0]) - 1]) if reply else (None, "")
                # Nothing waiting in any queue: block on the first one next.
                self._block_next = not reply
                if not reply and time.monotonic() < self._oom_until:
                    self._paused_until = time.monotonic() + _REFUSED_PAUSE_S
            else:
                item, source = reply, sources[0]
                self._block_next = False  # then look at every queue, in order
            if not item:
                raise Empty()
            dest = bytes_to_str(source).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                message = loads(bytes_to_str(item))
                if not isinstance(message, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self._dead_letter(item, exc)
                raise Empty() from None
            self.taken = item
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _dead_letter(self, item: bytes, exc: Exception) -> None:
        # Not a kombu message at all: kombu would fail on it and the worker lose it. Into
        # the dead-letter queue, out of the taken list, in one step (if Redis refuses, it
        # stays taken, and is put back on the queue when this worker consumes again).
        text = item.decode(errors="replace")
        entry = deadletter.new_entry(
            {"raw": text}, Reason.UNDECODABLE_MESSAGE, errors=[f"{type(exc).__name__}: {exc}"],
            entry_id=deadletter.entry_id_of(text),
        )  # fmt: skip
        pipe = self.lease_client.pipeline(transaction=True)
        deadletter.stage_add(pipe, [entry])
        pipe.lrem(lease.taken_key(), 1, item)
        try:
            pipe.execute()
        except RedisError as error:
            log.warning("message_not_dead_lettered", error=type(error).__name__)
            return
        log.warning("message_dead_lettered", reason=Reason.UNDECODABLE_MESSAGE.value,
                    entry=entry.id)  # fmt: skip

    def _refused(self, command: str) -> None:
        # At maxmemory Redis refuses BLMOVE (it may grow memory); the take script, flagged
        # allow-oom, still runs there. Before Redis 7 nothing can take: wait and retry.
        log.warning("take_refused", error="redis at maxmemory", command=command)
        if command != "EVAL" and self.allow_oom:
            self._oom_until = time.monotonic() + _OOM_SCRIPT_S
        else:
            self._paused_until = time.monotonic() + _REFUSED_PAUSE_S

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "BRPOP" and self.takes:
            return self.client.parse_response(self.client.connection, self._taking[0])
        return super()._poll_error(type, **options)

    def close(self) -> None:
        """Close, and beat no more for this channel."""
        lease.heartbeat(self.worker_lease).drop(self)
        super().close()

    def _size(self, queue: str) -> int:
        # Read without MULTI: Redis refuses a MULTI at maxmemory, even of reads.
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            for pri in self.priority_steps:
                pipe.llen(self._q_for_pri(queue, pri))
            return sum(n for n in pipe.execute() if isinstance(n, int))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        if (
            not self.allow_oom
            or queue in self._queue_expiries()
            or self.typeof(exchange).type == "fanout"
        ):
            super()._queue_bind(exchange, routing_key, pattern, queue)
            return
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        table = self.keyprefix_queue % (exchange,)
        # kombu keeps a permanent twin of the binding table.
        twin = self.keyprefix_binding_permanent % (exchange,)
        with self.conn_or_acquire() as client:
            client.eval(ALLOW_OOM + _BIND, 2, table, twin, member)

    def _queue_expiries(self) -> dict[str, Any]:
        # Queues with an expiry keep kombu's own code paths.
        return dict(self._expires)


class Channel(_ClosedAware, _AllowOom):
    """`redis://` and `rediss://` channels of a worker."""


class SentinelChannel(_ClosedAware, _AllowOom, kombu_redis.SentinelChannel):
    """`sentinel://` channels of a worker."""

    # kombu's Sentinel options (master_name...) as well as the relay's.
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "worker_lease")


class Transport(kombu_redis.Transport):
    """The workers' transport for `redis://` and `rediss://`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """The workers' transport for `sentinel://`."""

    Channel = SentinelChannel


def install() -> None:
    """Make kombu use these transports for Redis URLs in this process (a worker's)."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    # kombu caches what it resolved: too late if something already opened a Redis broker.
    chosen: object = get_transport_cls("redis")
    if chosen is not Transport:
        raise RuntimeError("relay.state.transport.install() ran after kombu chose a transport")
