"""The colombia dunning policy through the real charge path: the emulator's decline cards over HTTP, the test
clock set to January 2027, and the retry times written on the invoice and into invoice.payment_failed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest
from sqlalchemy import func, select

from billing.db.models import ChargeAttempt, Invoice, StreamEvent
from billing.sandbox.server import SandboxThread
from billing.services import catalog, invoicing
from billing.services.charging import charge_invoice
from billing.services.reconcile import due_invoice_ids
from tests.test_money_path_charges import World, make_world

BOGOTA = ZoneInfo("America/Bogota")
DECLINES_51 = "4000000000510000"
RECOVERS_51 = "4000000000770000"  # declines 51 on its first two charges, then approves
DECLINES_91 = "4000000000910002"
MONDAY = datetime(2027, 1, 4, 15, 0, tzinfo=UTC)  # 10:00 in Bogota


@pytest.fixture
def world(sqlite_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(sqlite_url, sandbox, dunning_policy="colombia")


def charge_due(world: World) -> list[str]:
    """Charge every invoice due now, as the sweep does; the outcomes."""
    with world.ctx.sessions() as session:
        due = due_invoice_ids(session, world.clock.now())
    return [str(charge_invoice(world.ctx, invoice_id).outcome) for invoice_id in due]


def failed_retry_times(world: World, invoice_id: int) -> list[str | None]:
    """`next_retry_at` of the invoice's invoice.payment_failed stream events, oldest first."""
    with world.ctx.sessions() as session:
        rows = session.execute(
            select(StreamEvent.data).where(StreamEvent.type == "invoice.payment_failed").order_by(StreamEvent.id)
        ).scalars()
        return [data["next_retry_at"] for data in rows if data["invoice_id"] == invoice_id]


def test_a_51_declined_on_2027_01_04_is_retried_on_paydays_and_recovers(world: World) -> None:
    world.clock.set(MONDAY)
    _, invoice_id, _ = world.subscriber(RECOVERS_51)
    assert charge_due(world) == ["declined"]
    payday = world.invoice(invoice_id).due_at
    # Friday 15 January at 09:00 in Bogota: a payday, not a Sunday, not the Epiphany holiday of Monday the 11th
    assert payday == datetime(2027, 1, 15, 14, 0, tzinfo=UTC)
    assert payday.astimezone(BOGOTA).weekday() == 4 and payday.date() not in holidays.Colombia(years=2027)
    assert failed_retry_times(world, invoice_id) == [payday.isoformat()]

    world.clock.set(payday - timedelta(minutes=1))
    assert charge_due(world) == []  # not before the payday
    world.clock.set(payday)
    assert charge_due(world) == ["declined"]
    # the next try is the business day after the payday (Monday the 18th), never the weekend between
    after = datetime(2027, 1, 18, 14, 0, tzinfo=UTC)
    assert world.invoice(invoice_id).due_at == after
    world.clock.set(after)
    assert charge_due(world) == ["approved"]
    assert world.invoice(invoice_id).state == "paid"
    assert failed_retry_times(world, invoice_id) == [payday.isoformat(), after.isoformat()]


def test_a_51_that_never_recovers_is_uncollectible_when_the_next_payday_is_past_the_window(world: World) -> None:
    world.clock.set(MONDAY)
    subscription_id, invoice_id, _ = world.subscriber(DECLINES_51)
    for _ in range(3):
        assert charge_due(world) == ["declined"]
        due = world.invoice(invoice_id).due_at
        if due is None:
            break
        world.clock.set(due)
    # Jan 4, 15 and 18 declined; the next payday (Jan 29) is past the 21-day window (Jan 25)
    assert world.invoice(invoice_id).state == "uncollectible"
    assert failed_retry_times(world, invoice_id)[-1] is None
    assert world.subscription(subscription_id).status == "unpaid"


def test_a_91_is_retried_within_hours(world: World) -> None:
    world.clock.set(MONDAY)
    _, invoice_id, _ = world.subscriber(DECLINES_91)
    assert charge_due(world) == ["declined"]
    assert world.invoice(invoice_id).due_at == MONDAY + timedelta(hours=2)
    world.clock.advance(timedelta(hours=2))
    assert charge_due(world) == ["declined"]
    assert world.invoice(invoice_id).due_at == MONDAY + timedelta(days=1, hours=2)  # then daily


def test_a_card_declined_15_times_in_30_days_is_not_retried_again(world: World) -> None:
    world.clock.set(MONDAY)
    customer_id = catalog.create_customer(world.ctx, email="ana@example.com")
    card_id = world.attach(customer_id, DECLINES_91)
    for _ in range(15):  # fifteen subscriptions on one card, each charged once
        catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=world.plan_id, card_id=card_id)
    invoicing.open_due_invoices(world.ctx)
    assert charge_due(world) == ["declined"] * 15
    with world.ctx.sessions() as session:
        states = list(session.execute(select(Invoice.state).order_by(Invoice.due_at.is_(None), Invoice.id)).scalars())
        assert session.execute(select(func.count()).select_from(ChargeAttempt)).scalar_one() == 15
    # the first fourteen declines are retried; the fifteenth is the card's last in 30 days
    assert [str(s) for s in states] == ["open"] * 14 + ["uncollectible"]
