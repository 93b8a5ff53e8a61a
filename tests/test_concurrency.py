"""Many workers claim the same due set at once: never two invoices for a period, never two charges for one."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from billing.db.models import ChargeAttempt, Invoice
from billing.services.charging import charge_invoice
from billing.services.invoicing import open_due_invoices
from billing.services.tick import run_tick
from tests.test_services import World, make_world


def _race(world: World, workers: int, work) -> None:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            work()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def _check(world: World, subscriptions: int, periods: int) -> None:
    with world.ctx.sessions() as s:
        invoices = s.execute(select(func.count(Invoice.id))).scalar_one()
        paid = s.execute(select(func.count(Invoice.id)).where(Invoice.state == "paid")).scalar_one()
        approved = s.execute(
            select(ChargeAttempt.invoice_id, func.count())
            .where(ChargeAttempt.state == "approved")
            .group_by(ChargeAttempt.invoice_id)
        ).all()
    assert invoices == subscriptions * periods
    assert paid == invoices
    assert len(approved) == invoices and all(n == 1 for _, n in approved)
    assert len(world.gateway.charges) == invoices  # the gateway saw exactly one charge per invoice
    assert all(n == 1 for n in world.gateway.approved_by_order().values())


def _scenario(url: str) -> None:
    world = make_world(url)
    subs = [world.subscriber() for _ in range(40)]
    _race(world, 4, lambda: run_tick(world.ctx, threads=4))
    world.advance(days=62)  # two more periods due at once
    _race(world, 4, lambda: run_tick(world.ctx, threads=4))
    _check(world, len(subs), 3)


def _duplicate_delivery(url: str) -> None:
    world = make_world(url)
    world.subscriber()
    _race(world, 4, lambda: open_due_invoices(world.ctx))
    with world.ctx.sessions() as s:
        (invoice_id,) = s.execute(select(Invoice.id)).scalars().all()
    outcomes: list[str] = []
    _race(world, 8, lambda: outcomes.append(charge_invoice(world.ctx, invoice_id).outcome))
    assert outcomes.count("approved") == 1
    assert world.gateway.calls["charge"] == 1


def test_concurrent_ticks_on_sqlite_never_duplicate_an_invoice_or_a_charge(sqlite_url: str):
    _scenario(sqlite_url)


def test_the_same_invoice_charged_by_eight_threads_on_sqlite_is_charged_once(sqlite_url: str):
    _duplicate_delivery(sqlite_url)


@pytest.mark.postgres
def test_concurrent_ticks_on_postgresql_never_duplicate_an_invoice_or_a_charge(pg_url: str):
    _scenario(pg_url)


@pytest.mark.postgres
def test_the_same_invoice_charged_by_eight_threads_on_postgresql_is_charged_once(pg_url: str):
    _duplicate_delivery(pg_url)
