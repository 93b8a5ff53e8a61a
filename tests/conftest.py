"""Shared fixtures: real services when present, clear skips when not.

Every skip in the suite goes through `service_missing`, so that BILLING_TEST_REQUIRE_SERVICES=1 (CI sets it)
turns each of them into a failure: a run that claims to have tested PostgreSQL, Redis or a private server
cannot pass without them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import NoReturn
from urllib.parse import quote

import pytest

REQUIRE_SERVICES = os.environ.get("BILLING_TEST_REQUIRE_SERVICES") == "1"
PG_URL = os.environ.get("BILLING_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BILLING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(what: str, why: str) -> NoReturn:
    """Skip the test with a clear reason, or fail it when services are required."""
    message = f"{what} is not available ({why})"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and BILLING_TEST_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(message + "; set BILLING_TEST_REQUIRE_SERVICES=1 to make this a failure")


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The base PostgreSQL URL, after checking that the server answers."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        service_missing("PostgreSQL", f"psycopg not importable: {exc}")
    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            conn.execute("select 1")
    except Exception as exc:
        service_missing("PostgreSQL", f"{PG_URL.split('@')[-1]}: {type(exc).__name__}")
    return PG_URL


@pytest.fixture
def pg_url(postgres_server_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    conninfo = postgres_server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'create schema "{schema}"')
    sep = "&" if "?" in postgres_server_url else "?"
    yield f"{postgres_server_url}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'drop schema "{schema}" cascade')


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """A Redis URL after checking that the server answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:
        service_missing("Redis", f"{REDIS_URL}: {type(exc).__name__}")
    return REDIS_URL


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A SQLite file URL in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/billing.db"


# --- Tpaga sandbox emulator -----------------------------------------------------------------------------
# One emulator per test session, reset over HTTP before each test: isolated like a fresh server, without
# paying a thread and a port per test. `sandbox_factory` gives a private emulator for non-default configs.
# The project's own client is tested against STRICT emulators (`sandbox`, and `sandbox_factory` unless told
# strict=False), so that what passes here depends on none of the leniency real Tpaga may or may not share.
# `lenient_sandbox` is the emulator as users run it by default, for the tests of that leniency.


def _started(strict: bool) -> Iterator[object]:
    from billing.sandbox import SandboxConfig, SandboxThread

    server = SandboxThread(SandboxConfig(strict=strict))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _shared_sandbox() -> Iterator[object]:
    yield from _started(strict=True)


@pytest.fixture(scope="session")
def _shared_lenient_sandbox() -> Iterator[object]:
    yield from _started(strict=False)


def _reset(server: object) -> object:
    import requests

    from billing.sandbox import SandboxThread

    assert isinstance(server, SandboxThread)
    requests.post(server.base_url + "__sandbox/reset", timeout=10).raise_for_status()
    return server


@pytest.fixture
def sandbox(_shared_sandbox: object) -> object:
    """A running strict SandboxThread, freshly reset (state, faults, clock, keys)."""
    return _reset(_shared_sandbox)


@pytest.fixture
def lenient_sandbox(_shared_lenient_sandbox: object) -> object:
    """A running lenient (default-config) SandboxThread, freshly reset."""
    return _reset(_shared_lenient_sandbox)


@pytest.fixture
def sandbox_factory() -> Iterator[object]:
    """Call with SandboxConfig fields (e.g. refund_window="same_day") to get a started SandboxThread; strict
    unless the call says strict=False."""
    from billing.sandbox import SandboxConfig, SandboxThread

    started: list[SandboxThread] = []

    def start(**fields: object) -> SandboxThread:
        fields.setdefault("strict", True)
        server = SandboxThread(SandboxConfig(**fields))  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
