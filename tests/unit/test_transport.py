"""relay.state.transport extends private parts of kombu's Redis transport: each must still
be there, so that a kombu upgrade fails here, loudly, rather than in a worker."""

from __future__ import annotations

import inspect

import pytest
from kombu.transport import redis, virtual
from kombu.transport.virtual import base

from relay.state import transport, unacked

# What the relay overrides or calls, per kombu class (methods, and class attributes).
USED: dict[type, list[str]] = {
    redis.QoS: [
        "append", "ack", "reject", "restore_unacked", "restore_visible", "restore_by_tag",
        "_remove_from_indices", "pipe_or_acquire", "unacked_key", "unacked_index_key",
        "visibility_timeout",
    ],
    virtual.QoS: ["append", "ack", "can_consume"],
    redis.Channel: [
        "_brpop_start", "_brpop_read", "_poll_error", "_flush_brpop_reauth", "_size",
        "_queue_bind", "_get_pool", "_q_for_pri", "_create_client", "conn_or_acquire",
        "close", "typeof", "client", "from_transport_options", "priority_steps", "sep",
        "keyprefix_queue", "keyprefix_binding_permanent", "global_keyprefix", "_in_poll",
        "_brpop_sent_at", "unacked_restore_limit",
    ],
    redis.SentinelChannel: ["_get_pool"],
    redis.Transport: ["Channel", "brpop_timeout"],
    base.Transport: ["_deliver"],
}  # fmt: skip


@pytest.mark.parametrize(("cls", "name"), [(c, n) for c, names in USED.items() for n in names])
def test_kombu_still_has_what_the_relay_extends(cls: type, name: str) -> None:
    assert hasattr(cls, name), f"kombu's {cls.__qualname__} has no {name} any more"


def test_the_overridden_methods_keep_their_signatures() -> None:
    for ours, theirs in [
        (unacked.QoS.restore_visible, redis.QoS.restore_visible),
        (unacked.QoS.restore_unacked, redis.QoS.restore_unacked),
        (unacked.QoS.reject, redis.QoS.reject),
        (transport.Channel._brpop_start, redis.Channel._brpop_start),
        (transport.Channel._queue_bind, redis.Channel._queue_bind),
    ]:
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        ), ours.__qualname__


def test_channels_keep_the_instance_state_the_relay_reads() -> None:
    # Set in Channel.__init__, so not class attributes: read from its source.
    source = inspect.getsource(redis.Channel.__init__)
    for name in ("self._queue_cycle", "self._expires", "self.brpop_timeout", "self.handlers"):
        assert name in source, name
    assert "'BRPOP': self._brpop_read" in source
    for channel in (transport.Channel, transport.SentinelChannel):
        assert "worker_lease" in channel.from_transport_options
    assert set(redis.SentinelChannel.from_transport_options) <= set(
        transport.SentinelChannel.from_transport_options
    )
