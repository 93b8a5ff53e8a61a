"""Regression tests for the charge-path defects of issue 11 that only PostgreSQL shows (3, 9): real concurrency
between two transactions, and a COMMIT whose acknowledgement is lost on the wire. The emulator answers over
real HTTP; PostgreSQL is reached directly, or through a TCP proxy that loses one COMMIT's answer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from billing.db.engine import normalize_url
from billing.db.models import Subscription
from billing.sandbox.server import SandboxThread
from billing.services.charging import charge_invoice
from billing.services.subscriptions import cancel_subscription
from tests.test_money_path_charges import SLOW_SECONDS, SOFT_DECLINE_51, World, make_world

CLAIM_SLEEP_SECONDS = 1.5


def wait_until(what: str, check: Any, timeout_seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- defect 3: cancel racing a claim ------------------------------------------------------------------------


@pytest.fixture
def pg_world(pg_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(pg_url, sandbox)


def backends_waiting(pg_url: str, event_type: str, event: str | None = None) -> int:
    """How many other sessions of this database wait on `event_type` (`Timeout`/`PgSleep`, `Lock`)."""
    engine = create_engine(normalize_url(pg_url))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "select count(*) from pg_stat_activity where datname = current_database() "
                        "and pid <> pg_backend_pid() and wait_event_type = :type "
                        "and (cast(:event as text) is null or wait_event = :event)"
                    ),
                    {"type": event_type, "event": event},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_cancel_racing_a_claim_voids_the_invoice_and_nothing_is_charged(pg_world: World, pg_url: str) -> None:
    world = pg_world
    subscription_id, invoice_id, _ = world.subscriber()
    # The claim's transaction sleeps after writing its attempt, holding the invoice's row lock: the cancel
    # arrives meanwhile and waits on that lock, as it does when the two meet in production.
    with world.ctx.sessions() as session, session.begin():
        session.execute(
            text(
                "create function slow_claim() returns trigger language plpgsql as "
                f"$$ begin perform pg_sleep({CLAIM_SLEEP_SECONDS}); return null; end $$"
            )
        )
        session.execute(
            text(
                "create trigger slow_claim after insert on charge_attempts "
                "for each statement execute function slow_claim()"
            )
        )
    charging = world.in_background(lambda: charge_invoice(world.ctx, invoice_id))
    wait_until("the claim to hold its lock", lambda: backends_waiting(pg_url, "Timeout", "PgSleep"))
    canceling = world.in_background(lambda: cancel_subscription(world.ctx, subscription_id=subscription_id))
    wait_until("the cancel to wait on the claim", lambda: backends_waiting(pg_url, "Lock"))

    assert canceling.result(timeout=30)["changed"] is True
    outcome = charging.result(timeout=30)
    assert outcome.outcome == "void"
    with world.ctx.sessions() as session:
        subscription = session.get(Subscription, subscription_id)
        assert subscription is not None and subscription.status == "canceled"
    assert world.invoice(invoice_id).state == "void"
    assert [a.state for a in world.attempts(invoice_id)] == ["not_sent"]
    assert world.emulator.charges(f"inv{invoice_id}-") == []  # nothing left for Tpaga


# --- defect 9: a lost COMMIT acknowledgement ----------------------------------------------------------------


class CommitAnswerDropper:
    """A TCP proxy to PostgreSQL that, once armed, forwards the next COMMIT, lets the server answer it, then
    drops both connections without passing that answer on: the transaction is committed and the client does
    not know. It reads the frontend's messages (type byte, length) to find a simple (`Q`) or extended (`P`)
    query whose text is COMMIT; connections must not use TLS (sslmode=disable)."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.armed = threading.Event()
        self.dropped = threading.Event()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> CommitAnswerDropper:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        answered = asyncio.Event()
        swallowing = False

        async def to_client() -> None:
            while data := await server_r.read(65536):
                if swallowing:
                    answered.set()  # the server answered the COMMIT: it has committed
                    continue
                client_w.write(data)
                await client_w.drain()

        async def to_server() -> None:
            nonlocal swallowing
            buffer, started = b"", False
            while data := await client_r.read(65536):
                buffer += data
                while True:
                    if not started:  # untyped: SSLRequest, GSSENCRequest or the startup message
                        if len(buffer) < 8 or len(buffer) < int.from_bytes(buffer[:4], "big"):
                            break
                        size = int.from_bytes(buffer[:4], "big")
                        code = int.from_bytes(buffer[4:8], "big")
                        started = code not in (80877103, 80877104)
                    else:
                        if len(buffer) < 5 or len(buffer) < 1 + int.from_bytes(buffer[1:5], "big"):
                            break
                        size = 1 + int.from_bytes(buffer[1:5], "big")
                    message, buffer = buffer[:size], buffer[size:]
                    commit = message[:1] in (b"Q", b"P") and b"COMMIT" in message.upper()
                    server_w.write(message)
                    await server_w.drain()
                    if started and commit and self.armed.is_set() and not self.dropped.is_set():
                        swallowing = True
                        await asyncio.wait_for(answered.wait(), timeout=10)
                        self.dropped.set()
                        client_w.transport.abort()
                        server_w.transport.abort()
                        return

        pumps = [asyncio.ensure_future(to_client()), asyncio.ensure_future(to_server())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_w, server_w):
                with contextlib.suppress(Exception):
                    writer.close()


@pytest.fixture
def proxy() -> Iterator[CommitAnswerDropper]:
    dropper = CommitAnswerDropper().start()
    yield dropper
    dropper.stop()


@pytest.fixture
def proxied_world(pg_url: str, sandbox: SandboxThread, proxy: CommitAnswerDropper) -> Iterator[World]:
    """A world whose database connections all go through the proxy."""
    proxied = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}") + "&sslmode=disable&gssencmode=disable"
    assert proxied != pg_url, "the test database is not at 127.0.0.1:5432"
    yield from make_world(proxied, sandbox)


def test_a_lost_commit_acknowledgement_counts_one_decline_once(
    proxied_world: World, proxy: CommitAnswerDropper
) -> None:
    world = proxied_world
    _, invoice_id, _ = world.subscriber(SOFT_DECLINE_51)
    world.emulator.faults(nextCharges=["slow"], slowSeconds=SLOW_SECONDS / 2)
    charging = world.in_background(lambda: charge_invoice(world.ctx, invoice_id))
    world.emulator.wait_for_charge(f"inv{invoice_id}-a1")
    proxy.armed.set()  # the next COMMIT is the one recording the decline

    outcome = charging.result(timeout=60)
    assert proxy.dropped.is_set()
    assert (outcome.outcome, outcome.error_code) == ("declined", "51")
    invoice = world.invoice(invoice_id)
    assert invoice.soft_failures == 1
    assert invoice.due_at is not None
    assert len(world.events("charge.declined", invoice_id=invoice_id)) == 1
    [attempt] = world.attempts(invoice_id)
    assert attempt.state == "declined"
