"""A channel whose broker connection was torn down (the transport detached, as Celery's consumer does when Redis
goes away) fails with a connection error, which Celery handles by reconnecting, never with the AttributeError
that made a worker exit after a Redis restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from tasks import resilience
from tests.conftest import service_missing
from tests.procs import RedisServer


@pytest.fixture(autouse=True)
def _configured_process() -> None:
    # Part of what a worker, beat or Flower does when it starts (tasks.configure_process); importing does not.
    resilience.install()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    try:
        server = RedisServer(tmp_path)
    except RuntimeError as exc:  # the binaries are missing; a server that fails to start is a failure
        service_missing("redis-server", str(exc))
    server.start()
    yield server.url
    server.stop()


def test_a_detached_channel_raises_a_connection_error(redis_url: str) -> None:
    connection = Connection(redis_url)
    channel = connection.channel()
    channel.client.ping()
    connection.transport.client = None  # what Connection.collect() does to the broken connection
    with pytest.raises(RedisConnectionError):
        channel._connparams()
    assert RedisConnectionError in connection.connection_errors  # what Celery handles by reconnecting


def test_a_live_channel_is_untouched(redis_url: str) -> None:
    with Connection(redis_url) as connection:
        channel = connection.channel()
        assert channel._connparams()["port"] == int(redis_url.rsplit(":", 1)[1].split("/")[0])
        channel.close()
