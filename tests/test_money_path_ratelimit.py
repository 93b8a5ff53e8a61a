"""Issue 11, defect 1: a charge must never leave after its lease expired.

With a low TPAGA_RATE_LIMIT, calls queue at the limiter. They used to wait there without bound: past their
lease, reconciliation flagged them unknown although nothing had left; the operator, following the review
procedure of docs/operations.md, correctly found no charge at Tpaga and resolved them `--not-charged`; the
retry charged; and then the queued first request left too. Two approvals for one invoice.

Real parts: the emulator over HTTP and its ledger, the client's in-process limiter, the worker's GatewayPool,
reconciliation and the operator's review commands as the procedure uses them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
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
from billing.gateway.ratelimit import LocalRateLimiter
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog
from billing.services.charging import charge_invoices
from billing.services.context import Context
from billing.services.invoicing import open_due_invoices
from billing.services.reconcile import expire_stuck_attempts, resolve_review, review_queue
from billing.services.tick import run_tick


def test_calls_queued_at_the_rate_limiter_past_their_lease_never_leave_and_nothing_is_charged_twice(
    sqlite_url: str, sandbox: Any
) -> None:
    # Given 20 due invoices, and a worker whose limiter lets 2 charges a second out
    migrate.upgrade(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    clock = TestClock()
    setup = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = Context(sessions=sessions, gateway=setup, clock=clock)
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    for n in range(20):
        customer = catalog.create_customer(ctx, email=f"c{n}@example.com")
        token = setup.tokenize_card(number="4111111111111111", exp_month=3, exp_year=2031, holder_name="C")
        catalog.attach_card(ctx, customer_id=customer, token=token)
        catalog.subscribe(ctx, customer_id=customer, plan_id=plan)
    assert open_due_invoices(ctx) == 20
    with sessions() as session:
        ids = list(session.execute(select(Invoice.id).order_by(Invoice.id)).scalars())
    limited = TpagaClient(
        sandbox.api_url,
        DEFAULT_PRIVATE_KEY,
        DEFAULT_PUBLIC_KEY,
        connect_timeout_seconds=1,
        read_timeout_seconds=2,
        rate_limiter=LocalRateLimiter(2, burst=1),
        rate_limit_max_wait_seconds=4,
    )
    worker = Context(
        sessions=sessions,
        gateway=limited,
        clock=clock,
        sending_lease=timedelta(seconds=8),
        answer_time=timedelta(seconds=3),
    )

    # When the batch runs, and 6 s later (its lease long gone by the billing clock) reconciliation runs
    pool = GatewayPool(32)
    batch = threading.Thread(target=charge_invoices, args=(worker, ids), kwargs={"pool": pool})
    batch.start()
    time.sleep(6)
    clock.advance(timedelta(seconds=9))
    flagged = expire_stuck_attempts(ctx)["unknown"]

    # And the operator works the review queue as docs/operations.md says: no charge at Tpaga -> not charged
    with sessions() as session:
        queue = review_queue(session, limit=None)
    for item in queue:
        found = requests.get(
            sandbox.base_url + "__sandbox/ledger", params={"orderId": item["order_id"]}, timeout=5
        ).json()["charges"]
        if found:
            resolve_review(ctx, invoice_id=item["invoice_id"], charged=True, tpaga_charge_id=found[0]["id"])
        else:
            resolve_review(ctx, invoice_id=item["invoice_id"], charged=False)
    # ... and billing goes on: the retries are charged
    clock.advance(timedelta(seconds=61))
    run_tick(ctx, threads=2)
    batch.join(timeout=30)
    pool.shutdown()
    run_tick(ctx, threads=2)

    # Then no request was left `sending` past its lease, and every invoice was charged exactly once
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=5).json()["charges"]
    approvals = Counter(c["orderId"].rsplit("-a", 1)[0] for c in ledger if c["paid"])
    assert flagged == 0
    assert approvals == Counter({f"inv{i}": 1 for i in ids})
    with sessions() as session:
        assert set(session.execute(select(Invoice.state)).scalars()) == {"paid"}
        states = Counter(str(s) for s in session.execute(select(ChargeAttempt.state)).scalars())
    assert states["approved"] == 20 and states["unknown"] == 0
    assert states["not_sent"] >= 1  # the calls the limiter could not let out in time were not sent
