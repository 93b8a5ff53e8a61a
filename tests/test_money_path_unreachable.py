"""Issue 11, defect 12 (last part): a worker whose every call is not sent for minutes raises an ALERT and pauses
billing, instead of rescheduling every invoice every minute forever; billing resumes by itself once Tpaga
answers again.

Real parts: the bundled emulator over HTTP for the customer, card and subscription; then a client pointed at a
loopback port where nothing listens (connection refused: provably not sent), as a production worker with a
wrong TPAGA_API_URL would be."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from billing.clock import TestClock
from billing.db import control, migrate
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import ChargeAttempt, Event
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog
from billing.services.context import Context
from billing.services.tick import run_tick


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_calls_never_sent_for_minutes_pause_billing_with_an_alert_and_it_resumes_when_tpaga_answers(
    sqlite_url: str, sandbox: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a subscription due now, its card stored at the emulator
    migrate.upgrade(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    clock = TestClock()
    tpaga = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = Context(sessions=sessions, gateway=tpaga, clock=clock)
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    customer = catalog.create_customer(ctx, email="c@example.com")
    token = tpaga.tokenize_card(number="4111111111111111", exp_month=3, exp_year=2031, holder_name="C")
    catalog.attach_card(ctx, customer_id=customer, token=token)
    catalog.subscribe(ctx, customer_id=customer, plan_id=plan)

    # When the worker's gateway URL leads nowhere, for six minutes of ticks
    nowhere = TpagaClient(
        f"http://127.0.0.1:{_closed_port()}/api/", DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, retry_attempts=1
    )
    broken = Context(sessions=sessions, gateway=nowhere, clock=clock, not_sent_backoff=timedelta(seconds=60))
    caplog.set_level(logging.WARNING)
    for _ in range(7):
        run_tick(broken, threads=1)
        clock.advance(timedelta(seconds=61))

    # Then billing is paused for an unreachable gateway, with an ALERT, and nothing more is tried
    with sessions() as session:
        pause = control.get_pause(session)
        kinds = list(session.execute(select(Event.kind)).scalars())
        tried = len(session.execute(select(ChargeAttempt.id)).all())
    assert pause is not None and pause["reason"] == "gateway_unreachable"
    assert kinds.count("billing.paused") == 1
    assert any("ALERT billing.paused" in r.getMessage() for r in caplog.records)
    run_tick(broken, threads=1)
    with sessions() as session:
        assert len(session.execute(select(ChargeAttempt.id)).all()) == tried

    # And once the gateway answers again, the next tick resumes billing and charges the invoice
    report = run_tick(ctx, threads=1)
    assert report["resumed"] is True
    assert report["charges"].get("approved") == 1


def test_one_answer_from_tpaga_ends_the_run_of_not_sent_calls(sqlite_url: str, sandbox: Any) -> None:
    migrate.upgrade(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    clock = TestClock()
    tpaga = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = Context(sessions=sessions, gateway=tpaga, clock=clock)
    nowhere = TpagaClient(
        f"http://127.0.0.1:{_closed_port()}/api/", DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, retry_attempts=1
    )
    broken = Context(sessions=sessions, gateway=nowhere, clock=clock)
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))

    def subscriber(n: int) -> None:
        customer = catalog.create_customer(ctx, email=f"c{n}@example.com")
        token = tpaga.tokenize_card(number="4111111111111111", exp_month=3, exp_year=2031, holder_name="C")
        catalog.attach_card(ctx, customer_id=customer, token=token)
        catalog.subscribe(ctx, customer_id=customer, plan_id=plan)

    # Given a call not sent, then four minutes later an approved charge
    subscriber(1)
    assert run_tick(broken, threads=1)["charges"] == {"not_sent": 1}
    clock.advance(timedelta(minutes=4))
    assert run_tick(ctx, threads=1)["charges"] == {"approved": 1}

    # When a new subscriber's call is not sent two minutes after that (six after the first not-sent call)
    clock.advance(timedelta(minutes=2))
    subscriber(2)
    assert run_tick(broken, threads=1)["charges"] == {"not_sent": 1}

    # Then billing is not paused: the answer in between ended the run
    with sessions() as session:
        assert control.get_pause(session) is None
