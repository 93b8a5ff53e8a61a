"""Regression tests for the charge-path defects of issue 11 that SQLite shows (2, 4, 6): the product's services
against the bundled Tpaga emulator over real HTTP, its fault injection making a charge slow or its answer lost,
and real threads where an operator or a customer acts while a request is in flight."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import select, update

from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Card, ChargeAttempt, Event, Invoice, Refund, Subscription
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from billing.services import catalog, invoicing, refunds, voids
from billing.services.charging import charge_invoice
from billing.services.context import Context
from billing.services.reconcile import expire_stuck_attempts, resolve_review

APPROVES = "4111111111111111"
HARD_DECLINE_04 = "4000000000040008"
SOFT_DECLINE_51 = "4000000000510000"
SLOW_SECONDS = 2.0


class Emulator:
    """The running emulator's /__sandbox/ surface."""

    def __init__(self, server: SandboxThread) -> None:
        self.base = server.base_url + "__sandbox/"
        self.api_url = server.api_url

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = requests.post(self.base + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def faults(self, **body: Any) -> Any:
        return self._post("faults", body)

    def keys(self, private_key: str, public_key: str) -> Any:
        return self._post("keys", {"privateKey": private_key, "publicKey": public_key})

    def charges(self, order_prefix: str = "") -> list[dict[str, Any]]:
        response = requests.get(self.base + "ledger", timeout=10)
        response.raise_for_status()
        return [c for c in response.json()["charges"] if str(c["orderId"]).startswith(order_prefix)]

    def wait_for_charge(self, order_id: str, timeout_seconds: float = 10.0) -> dict[str, Any]:
        """The ledger's charge of this orderId, once the request has reached the emulator."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            found = self.charges(order_id)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no charge {order_id} reached the emulator")


@dataclass
class World:
    """A billing database and Context whose gateway is a real TpagaClient talking to the emulator."""

    ctx: Context
    clock: TestClock
    client: TpagaClient
    emulator: Emulator
    plan_id: int

    def subscriber(self, number: str = APPROVES) -> tuple[int, int, str]:
        """A customer with a card of this number, subscribed now: (subscription id, its first invoice, the
        card's Tpaga id)."""
        customer_id = catalog.create_customer(self.ctx, email="ana@example.com")
        card_id = self.attach(customer_id, number)
        subscription_id = catalog.subscribe(self.ctx, customer_id=customer_id, plan_id=self.plan_id, card_id=card_id)
        invoicing.open_due_invoices(self.ctx)
        with self.ctx.sessions() as session:
            invoice_id = session.execute(
                select(Invoice.id).where(Invoice.subscription_id == subscription_id)
            ).scalar_one()
        return subscription_id, invoice_id, self.tpaga_card_id(card_id)

    def attach(self, customer_id: int, number: str) -> int:
        token = self.client.tokenize_card(number=number, exp_month=5, exp_year=2035, holder_name="Ana", cvc="123")
        return catalog.attach_card(self.ctx, customer_id=customer_id, token=token)

    def tpaga_card_id(self, card_id: int) -> str:
        with self.ctx.sessions() as session:
            card = session.get(Card, card_id)
            assert card is not None
            return card.tpaga_card_id

    def subscription_customer(self, subscription_id: int) -> int:
        with self.ctx.sessions() as session:
            subscription = session.get(Subscription, subscription_id)
            assert subscription is not None
            return subscription.customer_id

    def subscription(self, subscription_id: int) -> Subscription:
        with self.ctx.sessions() as session:
            return session.get_one(Subscription, subscription_id)

    def invoice(self, invoice_id: int) -> Invoice:
        with self.ctx.sessions() as session:
            invoice = session.get(Invoice, invoice_id)
            assert invoice is not None
            return invoice

    def attempts(self, invoice_id: int) -> list[ChargeAttempt]:
        with self.ctx.sessions() as session:
            return list(
                session.execute(
                    select(ChargeAttempt)
                    .where(ChargeAttempt.invoice_id == invoice_id)
                    .order_by(ChargeAttempt.attempt_number)
                ).scalars()
            )

    def events(self, kind: str, **match: int) -> list[Event]:
        with self.ctx.sessions() as session:
            query = select(Event).where(Event.kind == kind).order_by(Event.id)
            for column, value in match.items():
                query = query.where(getattr(Event, column) == value)
            return list(session.execute(query).scalars())

    def refunds_of(self, attempt_id: int) -> list[Refund]:
        with self.ctx.sessions() as session:
            return list(session.execute(select(Refund).where(Refund.charge_attempt_id == attempt_id)).scalars())

    def in_background(self, work: Callable[[], Any]) -> Future[Any]:
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(work)
        pool.shutdown(wait=False)
        return future

    def expire_leases(self) -> dict[str, int]:
        """Reconciliation after the sending lease has passed (the worker looks lost)."""
        self.clock.advance(self.ctx.sending_lease + timedelta(seconds=1))
        return expire_stuck_attempts(self.ctx)


def make_world(database_url: str, server: SandboxThread, **settings: Any) -> Iterator[World]:
    migrate.upgrade(database_url)
    emulator = Emulator(server)
    client = TpagaClient(server.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, read_timeout_seconds=15.0)
    clock = TestClock(datetime.now(UTC))  # near Tpaga's clock: its dateCreated and void window are wall time
    ctx = build_context(Settings(database_url=database_url, **settings), gateway=client, clock=clock)
    plan_id = catalog.create_plan(ctx, code="pro", name="Pro", amount=Money(4_500_000, "COP"))
    try:
        yield World(ctx, clock, client, emulator, plan_id)
    finally:
        client.close()
        ctx.sessions.kw["bind"].dispose()


@pytest.fixture
def world(sqlite_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(sqlite_url, sandbox)


def unvoided_approvals(world: World, invoice_id: int) -> list[dict[str, Any]]:
    return [c for c in world.emulator.charges(f"inv{invoice_id}-") if c["paid"] and not c["voided"]]


# --- defect 2: a late approval after the operator's --not-charged ------------------------------------------


def test_a_late_approval_after_not_charged_is_recorded_on_its_attempt_flagged_and_refundable(world: World) -> None:
    _, invoice_id, _ = world.subscriber()
    world.emulator.faults(nextCharges=["slow"], slowSeconds=SLOW_SECONDS)
    first = world.in_background(lambda: charge_invoice(world.ctx, invoice_id))
    tpaga_charge = world.emulator.wait_for_charge(f"inv{invoice_id}-a1")

    # The worker looks lost: reconciliation flags the attempt, and the operator finds nothing (yet) at Tpaga.
    assert world.expire_leases()["unknown"] == 1
    assert resolve_review(world.ctx, invoice_id=invoice_id, charged=False) == "not_charged"

    assert first.result(timeout=30).outcome == "approved"  # Tpaga's 201 arrives late
    [attempt] = world.attempts(invoice_id)
    assert attempt.state == "approved"
    assert attempt.tpaga_charge_id == tpaga_charge["id"]
    assert world.invoice(invoice_id).state == "paid"
    [late] = world.events("attempt.late_answer", attempt_id=attempt.id)
    assert late.data["outcome"] == "approved" and late.data["settled_as"] == "not_sent"

    refund = refunds.request_refund(world.ctx, invoice_id=invoice_id, reason="customer asked")
    assert voids.execute_refund(world.ctx, refund.refund_id).state == "voided"
    assert unvoided_approvals(world, invoice_id) == []


def test_a_late_approval_after_the_retry_was_approved_is_a_duplicate_and_voided(world: World) -> None:
    _, invoice_id, _ = world.subscriber()
    world.emulator.faults(nextCharges=["slow"], slowSeconds=SLOW_SECONDS)
    first = world.in_background(lambda: charge_invoice(world.ctx, invoice_id))
    world.emulator.wait_for_charge(f"inv{invoice_id}-a1")
    assert world.expire_leases()["unknown"] == 1
    assert resolve_review(world.ctx, invoice_id=invoice_id, charged=False) == "not_charged"

    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"  # the retry, while a1 is still in flight
    assert world.invoice(invoice_id).state == "paid"
    assert first.result(timeout=30).outcome == "duplicate"

    late, retry = world.attempts(invoice_id)
    assert (late.state, retry.state) == ("duplicate", "approved")
    assert late.tpaga_charge_id is not None
    [refund] = world.refunds_of(late.id)
    assert voids.execute_refund(world.ctx, refund.id).state == "voided"
    assert world.events("charge.duplicate", attempt_id=late.id)
    # Tpaga's ledger: exactly one approval of the invoice stands.
    assert [c["orderId"] for c in unvoided_approvals(world, invoice_id)] == [f"inv{invoice_id}-a2"]


# --- defect 4: a card attached while the old card's charge is in flight -------------------------------------


def test_a_card_attached_while_the_old_cards_charge_is_in_flight_is_charged_after_the_hard_decline(
    world: World,
) -> None:
    subscription_id, invoice_id, old_card = world.subscriber(HARD_DECLINE_04)
    world.emulator.faults(nextCharges=["slow"], slowSeconds=SLOW_SECONDS)
    first = world.in_background(lambda: charge_invoice(world.ctx, invoice_id))
    world.emulator.wait_for_charge(f"inv{invoice_id}-a1")

    customer_id = world.subscription_customer(subscription_id)
    new_card = world.tpaga_card_id(world.attach(customer_id, APPROVES))  # while the old card's charge is out
    outcome = first.result(timeout=30)
    assert (outcome.outcome, outcome.error_code) == ("declined", "04")

    invoice = world.invoice(invoice_id)
    assert invoice.state == "open"
    assert invoice.due_at is not None and invoice.due_at <= world.clock.now()  # due again, with the new card
    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"
    assert world.invoice(invoice_id).state == "paid"
    charged = {c["orderId"]: (c["creditCard"], c["paid"]) for c in world.emulator.charges(f"inv{invoice_id}-")}
    assert charged == {f"inv{invoice_id}-a1": (old_card, False), f"inv{invoice_id}-a2": (new_card, True)}


# --- defect 6: a charge voided at Tpaga, found by a lookup ---------------------------------------------------


def unknown_attempt_with_charge_id(world: World, invoice_id: int) -> tuple[int, str]:
    """Charge the invoice with the answer dropped (the charge is made): the attempt is unknown, its invoice in
    review. Then give the attempt the charge id Tpaga made, as a 402 carrying it does: the emulator answers
    every 402 with a charge that stays unpaid, so it cannot produce an unknown attempt whose charge is later
    approved."""
    world.emulator.faults(nextCharges=["drop"])
    assert charge_invoice(world.ctx, invoice_id).outcome == "unknown"
    [attempt] = world.attempts(invoice_id)
    charge_id = world.emulator.wait_for_charge(attempt.order_id)["id"]
    with world.ctx.sessions() as session, session.begin():
        session.execute(update(ChargeAttempt).where(ChargeAttempt.id == attempt.id).values(tpaga_charge_id=charge_id))
    return attempt.id, charge_id


def test_a_charge_voided_at_tpaga_settles_its_attempt_without_stopping_the_sweep_or_the_probe(world: World) -> None:
    from tasks.app import runtime
    from tasks.periodic import reconcile_attempts

    _, voided_invoice, _ = world.subscriber()
    _, other_invoice, _ = world.subscriber()
    _, paused_invoice, _ = world.subscriber()
    voided_attempt, voided_charge = unknown_attempt_with_charge_id(world, voided_invoice)
    other_attempt, _ = unknown_attempt_with_charge_id(world, other_invoice)
    world.client.refund(voided_charge)  # voided at Tpaga (its dashboard) before this system learned of it

    # A revoked key pauses billing; the key is fixed, and the reconcile task's probe is what resumes billing.
    world.emulator.keys("k" * 32, "pk_test_" + "k" * 24)
    assert charge_invoice(world.ctx, paused_invoice).outcome == "paused"
    world.emulator.keys(DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)

    runtime.use_factory(lambda: world.ctx)
    try:
        result = reconcile_attempts.apply().get(timeout=30)
    finally:
        runtime.use_factory(None)
    assert result["resumed"] is True
    assert world.events("billing.resumed")

    [attempt] = world.attempts(voided_invoice)
    assert attempt.state == "approved" and attempt.tpaga_charge_id == voided_charge
    assert world.invoice(voided_invoice).state == "paid"  # paid, then given back
    assert [r.state for r in world.refunds_of(voided_attempt)] == ["voided"]
    [other] = world.attempts(other_invoice)
    assert other.id == other_attempt and other.state == "approved"
    assert world.invoice(other_invoice).state == "paid"
    assert world.refunds_of(other_attempt) == []
