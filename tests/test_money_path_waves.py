"""Issue 11, defect 1 (last part): a batch records its answers as they arrive, not when its slowest call returns.

A slow call (rate-limited, or a slow Tpaga) used to keep every other answer of its wave unrecorded: a worker
lost meanwhile left them all `sending`, and reconciliation sent charges that had been answered to review.
Real parts: the emulator over HTTP with its `slow` fault on the first charge, the worker's GatewayPool."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
from sqlalchemy import select

from billing.clock import TestClock
from billing.db import migrate
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import ChargeAttempt, Invoice
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.gateway.pool import GatewayPool
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog
from billing.services.charging import charge_invoices
from billing.services.context import Context
from billing.services.invoicing import open_due_invoices


def test_the_answers_of_a_wave_are_recorded_while_its_slowest_call_is_still_out(sqlite_url: str, sandbox: Any) -> None:
    # Given three due invoices, and a Tpaga whose first charge answers only after 3 seconds
    migrate.upgrade(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    tpaga = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = Context(sessions=sessions, gateway=tpaga, clock=TestClock())
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    for n in range(3):
        customer = catalog.create_customer(ctx, email=f"c{n}@example.com")
        token = tpaga.tokenize_card(number="4111111111111111", exp_month=3, exp_year=2031, holder_name="C")
        catalog.attach_card(ctx, customer_id=customer, token=token)
        catalog.subscribe(ctx, customer_id=customer, plan_id=plan)
    assert open_due_invoices(ctx) == 3
    with sessions() as session:
        ids = list(session.execute(select(Invoice.id).order_by(Invoice.id)).scalars())
    requests.post(
        sandbox.base_url + "__sandbox/faults", json={"nextCharges": ["slow"], "slowSeconds": 3}, timeout=5
    ).raise_for_status()

    # When the batch runs on a worker's pool
    pool = GatewayPool(8)
    outcomes: list[Any] = []
    batch = threading.Thread(target=lambda: outcomes.extend(charge_invoices(ctx, ids, pool=pool)))
    started = time.monotonic()
    batch.start()

    # Then the two fast answers are recorded while the slow call is still out
    def states() -> list[str]:
        with sessions() as session:
            return sorted(str(s) for s in session.execute(select(ChargeAttempt.state)).scalars())

    seen: list[str] = []
    while time.monotonic() - started < 2.5:
        seen = states()
        if seen == ["approved", "approved", "sending"]:
            break
        time.sleep(0.05)
    assert seen == ["approved", "approved", "sending"]
    assert batch.is_alive()

    # And the slow one is recorded when it answers
    batch.join(timeout=15)
    pool.shutdown()
    assert [o.outcome for o in outcomes] == ["approved"] * 3
    assert states() == ["approved"] * 3
