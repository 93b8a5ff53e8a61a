"""Workers survive a broker restart: a narrow guard around a kombu bug.

When Redis goes away while a worker holds unacknowledged messages, Celery's consumer first `collect()`s the
broken connection, which detaches its transport (`transport.client = None`), then closes it. Anything that
still talks through a channel of that connection (restoring the unacknowledged messages when the channel
closes, or the acknowledgement of a task that finished during the outage) then fails in kombu's Redis
`Channel._connparams` with `AttributeError: 'NoneType' object has no attribute 'hostname'`. Celery expects a
connection error there (`ignore_errors`, `Message.ack_log_error`), so the AttributeError escapes: the
consumer's reconnect path dies, or the event loop does right after reconnecting, and the worker exits
(celery 5.7 / kombu 5.7; the same family as kombu#582). It happens whenever a task is still running when
Redis goes away, as a batch of charges often is (the reliability suite's broker scenario).

`install()` makes a channel whose connection is gone raise the Redis ConnectionError that every caller
already handles as "connection lost": the consumer reconnects, and an acknowledgement that cannot be sent is
logged ("Couldn't ack") instead of killing the worker. Nothing is lost: Redis hands an unacknowledged message
out again after the visibility timeout, and the database's sweep re-enqueues its work sooner.
"""

from __future__ import annotations

from typing import Any

_INSTALLED = "_billing_detached_transport_is_a_connection_error"


def install() -> None:
    """Wrap kombu's Redis `Channel._connparams` once per process (idempotent)."""
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    channel: Any = kombu_redis.Channel
    original = channel._connparams
    if getattr(original, _INSTALLED, False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("this channel's broker connection was closed after the broker went away")
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _INSTALLED, True)
    channel._connparams = _connparams
