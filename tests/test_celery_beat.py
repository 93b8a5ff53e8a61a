"""Beat end to end with real processes, and two beats at once: a due subscription is invoiced and charged
with nobody sending anything by hand, exactly once, and an intent left in the outbox is relayed."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import ChargeAttempt, Invoice, OutboxMessage, Refund
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, refunds
from tasks.testing import CeleryProcess, private_redis_db, process_env, worker

pytestmark = [pytest.mark.celery, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


def test_two_beats_invoice_and_charge_a_due_subscription_once(
    sqlite_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    # Given a subscription due now, and no invoice yet
    migrate.upgrade(sqlite_url)
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = build_context(
        Settings(database_url=sqlite_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY),
        gateway=gateway,
    )
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    customer = catalog.create_customer(ctx, email="c@example.com")
    token = gateway.tokenize_card(number="4111111111111111", exp_month=3, exp_year=2031, holder_name="C")
    catalog.attach_card(ctx, customer_id=customer, token=token)
    catalog.subscribe(ctx, customer_id=customer, plan_id=plan)

    env = process_env(
        {
            "DATABASE_URL": sqlite_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            "BILLING_BEAT_OPEN_SECONDS": "1",
            "BILLING_BEAT_SWEEP_SECONDS": "2",
            "BILLING_BEAT_REFUNDS_SECONDS": "2",
            "BILLING_BEAT_RECONCILE_SECONDS": "2",
            "BILLING_BEAT_OUTBOX_SECONDS": "1",
            "BILLING_OUTBOX_MIN_AGE_SECONDS": "1",
        }
    )
    beats = [
        CeleryProcess(
            ["beat", "--loglevel", "INFO", "-s", str(tmp_path / f"schedule-{n}")], env, tmp_path / f"beat-{n}.log"
        )
        for n in (1, 2)
    ]
    try:
        with worker(env, tmp_path / "worker.log") as proc:
            proc.wait_for_log(r"ready\.")
            # When two beats run at once
            for beat in beats:
                beat.start()

            # Then the invoice is opened and paid with one charge at Tpaga
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with ctx.sessions() as s:
                    paid = s.execute(select(Invoice.id).where(Invoice.state == "paid")).scalar_one_or_none()
                if paid:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"no invoice paid by beat; worker log:\n{proc.log_text()[-3000:]}")

            # And an intent whose publish never happened (this process has no publisher) is relayed
            requested = refunds.request_refund(ctx, invoice_id=paid, reason="relay me")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with ctx.sessions() as s:
                    state = s.get(Refund, requested.refund_id).state  # type: ignore[union-attr]
                if state == "voided":
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"refund {state}; worker log:\n{proc.log_text()[-3000:]}")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with ctx.sessions() as s:
                    waiting = s.execute(select(func.count()).where(OutboxMessage.published_at.is_(None))).scalar_one()
                if not waiting:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"the outbox was not relayed; worker log:\n{proc.log_text()[-3000:]}")
            log = proc.log_text()
    finally:
        for beat in beats:
            beat.stop()
        gateway.close()

    with ctx.sessions() as s:
        assert s.execute(select(func.count(Invoice.id))).scalar_one() == 1
        assert s.execute(select(func.count(ChargeAttempt.id))).scalar_one() == 1
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=10).json()
    assert len(ledger["charges"]) == 1
    assert len(ledger["refunds"]) == 1  # run_refunds and the relay both enqueued it; one void reached Tpaga
    for name in ("open_due_invoices", "enqueue_due_invoices", "run_refunds", "reconcile", "relay_outbox"):
        assert re.search(rf"billing\.{name}\[[^\]]+\] succeeded", log), name
    # Both beats sent every tick; the lease let one run of each tick do the work.
    assert "lease held" in log
    assert "'published': 1" in log
    assert not re.search(r"ERROR/", log)
    ctx.sessions.kw["bind"].dispose()
