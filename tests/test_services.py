"""Service-layer scenarios with a fake gateway and the test clock: months of billing in milliseconds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing.clock import TestClock
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Base, Card, ChargeAttempt, Invoice, OutboxMessage, Refund, Subscription
from billing.domain.dunning import DunningPolicy
from billing.domain.money import Money
from billing.services import catalog, reports
from billing.services.charging import charge_invoice
from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound
from billing.services.pause import resume_billing
from billing.services.reconcile import expire_stuck_attempts, resolve_review, review_queue
from billing.services.refunds import request_refund
from billing.services.subscriptions import cancel_subscription
from billing.services.tick import run_tick
from billing.services.voids import execute_refund
from tests.fakes import FakeGateway

START = datetime(2026, 1, 31, 15, 0, tzinfo=UTC)  # a month-end anchor: Jan 31 -> Feb 28 -> Mar 31


@dataclass
class World:
    ctx: Context
    clock: TestClock
    gateway: FakeGateway
    plan_id: int

    def customer_with_card(self, script: list[str] | None = None, token: str | None = None) -> tuple[int, int]:
        token = token or f"tok-{self.gateway.calls['associate_card']}"
        if script is not None:
            self.gateway.scripts[token] = script
        customer_id = catalog.create_customer(self.ctx, email="ana@example.com")
        card_id = catalog.attach_card(self.ctx, customer_id=customer_id, token=token)
        return customer_id, card_id

    def subscriber(self, script: list[str] | None = None, **kw: object) -> int:
        customer_id, _ = self.customer_with_card(script)
        return catalog.subscribe(self.ctx, customer_id=customer_id, plan_id=kw.pop("plan_id", self.plan_id), **kw)  # type: ignore[arg-type]

    def tick(self) -> dict[str, object]:
        return run_tick(self.ctx, threads=2)

    def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))

    def invoices(self, subscription_id: int) -> list[Invoice]:
        with self.ctx.sessions() as s:
            return list(
                s.execute(
                    select(Invoice).where(Invoice.subscription_id == subscription_id).order_by(Invoice.period_index)
                ).scalars()
            )

    def subscription(self, subscription_id: int) -> Subscription:
        with self.ctx.sessions() as s:
            sub = s.get(Subscription, subscription_id)
            assert sub is not None
            return sub

    def attempts(self, invoice_id: int) -> list[ChargeAttempt]:
        with self.ctx.sessions() as s:
            return list(
                s.execute(
                    select(ChargeAttempt)
                    .where(ChargeAttempt.invoice_id == invoice_id)
                    .order_by(ChargeAttempt.attempt_number)
                ).scalars()
            )

    def status(self) -> dict[str, object]:
        with self.ctx.sessions() as s:
            return reports.status(s)


def make_world(url: str, policy: DunningPolicy | None = None) -> World:
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    clock = TestClock(START)
    gateway = FakeGateway()
    ctx = Context(sessions=make_session_factory(engine), gateway=gateway, clock=clock, policy=policy or DunningPolicy())
    plan_id = catalog.create_plan(ctx, code="pro", name="Pro", amount=Money(4_500_000, "COP"))
    return World(ctx, clock, gateway, plan_id)


@pytest.fixture
def world(sqlite_url: str) -> Iterator[World]:
    yield make_world(sqlite_url)


def no_double_charges(world: World) -> None:
    assert all(n == 1 for n in world.gateway.approved_by_order().values())
    with world.ctx.sessions() as s:
        per_invoice = s.execute(
            select(ChargeAttempt.invoice_id, func.count())
            .where(ChargeAttempt.state == "approved")
            .group_by(ChargeAttempt.invoice_id)
        ).all()
    assert all(n == 1 for _, n in per_invoice)


def test_a_monthly_subscription_is_charged_once_per_period_for_a_year_and_the_anchor_never_drifts(world: World):
    sub_id = world.subscriber()
    for _ in range(12):
        world.tick()
        world.tick()  # a second cycle in the same period changes nothing
        world.advance(days=31)
    world.tick()
    invoices = world.invoices(sub_id)
    assert [i.state for i in invoices] == ["paid"] * 13
    assert len(world.gateway.charges) == 13
    starts = [i.period_start.astimezone(UTC) for i in invoices]
    # Jan 31 anchor: Feb 28, Mar 31, Apr 30 ... the day returns to 31 whenever the month has one
    assert [s.day for s in starts[:5]] == [31, 28, 31, 30, 31]
    assert all(a.period_end == b.period_start for a, b in itertools.pairwise(invoices))
    no_double_charges(world)


def test_after_downtime_every_missed_period_gets_exactly_one_invoice(world: World):
    sub_id = world.subscriber()
    world.tick()
    world.advance(days=95)  # the worker was down for three months
    world.tick()
    world.tick()
    invoices = world.invoices(sub_id)
    assert [i.period_index for i in invoices] == [0, 1, 2, 3]
    assert all(i.state == "paid" for i in invoices)
    no_double_charges(world)


def test_a_charge_invoice_delivered_twice_charges_once(world: World):
    world.subscriber()
    from billing.services.invoicing import open_due_invoices

    assert open_due_invoices(world.ctx) == 1
    with world.ctx.sessions() as s:
        invoice_id = s.execute(select(Invoice.id)).scalar_one()
    first = charge_invoice(world.ctx, invoice_id)
    second = charge_invoice(world.ctx, invoice_id)
    assert (first.outcome, second.outcome) == ("approved", "already_paid")
    assert world.gateway.calls["charge"] == 1


def test_soft_declines_follow_the_dunning_schedule_then_the_invoice_is_uncollectible(world: World):
    sub_id = world.subscriber(script=["51"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "open" and invoice.soft_failures == 1
    assert invoice.due_at == invoice.first_failure_at + timedelta(days=1)
    assert world.subscription(sub_id).status == "past_due"
    for day in (1, 3, 5, 7):
        world.clock.set(invoice.first_failure_at + timedelta(days=day, minutes=1))
        world.tick()
    (invoice, *_rest) = world.invoices(sub_id)
    assert invoice.state == "uncollectible"
    assert invoice.soft_failures == 5
    assert world.gateway.calls["charge"] == 5
    sub = world.subscription(sub_id)
    assert sub.status == "unpaid" and sub.next_billing_at is None
    world.advance(days=60)
    world.tick()
    assert world.gateway.calls["charge"] == 5  # an unpaid subscription stops renewing


def test_dunning_can_cancel_instead_of_marking_unpaid(sqlite_url: str):
    world = make_world(sqlite_url, DunningPolicy(retry_days=(1,), final_action="canceled"))
    sub_id = world.subscriber(script=["05"])
    world.tick()
    world.advance(days=1, minutes=1)
    world.tick()
    assert world.invoices(sub_id)[0].state == "uncollectible"
    assert world.subscription(sub_id).status == "canceled"


def test_a_soft_decline_that_recovers_on_retry_makes_the_subscription_active_again(world: World):
    sub_id = world.subscriber(script=["51", "51", "00"])
    world.tick()
    world.advance(days=1, minutes=1)
    world.tick()
    world.advance(days=2)
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "paid"
    assert [a.state for a in world.attempts(invoice.id)] == ["declined", "declined", "approved"]
    assert [a.error_code for a in world.attempts(invoice.id)] == ["51", "51", "00"]
    assert world.subscription(sub_id).status == "active"


def test_a_hard_decline_marks_the_card_unusable_and_a_new_card_retries_at_once(world: World):
    customer_id, card_id = world.customer_with_card(["43"])
    sub_id = catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=world.plan_id)
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "open" and invoice.due_at is None and invoice.soft_failures == 0
    assert world.subscription(sub_id).status == "past_due"
    with world.ctx.sessions() as s:
        assert s.get(Card, card_id).status == "unusable"
    world.advance(days=10)
    world.tick()
    assert world.gateway.calls["charge"] == 1  # never retried on the same card
    catalog.attach_card(world.ctx, customer_id=customer_id, token="new-good-card")
    world.tick()
    (invoice,) = world.invoices(sub_id)[:1]
    assert invoice.state == "paid"
    assert world.subscription(sub_id).status == "active"


def test_a_merchant_error_pauses_billing_without_spending_the_customers_attempts(world: World):
    sub_id = world.subscriber(script=["5003", "00"])
    other = world.subscriber()
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.soft_failures == 0 and invoice.state == "open"
    assert world.status()["paused"]["reason"] == "merchant_decline"
    assert world.gateway.calls["charge"] <= 2
    world.tick()
    charges_while_paused = world.gateway.calls["charge"]
    world.tick()
    assert world.gateway.calls["charge"] == charges_while_paused
    assert resume_billing(world.ctx)
    world.tick()
    assert world.invoices(sub_id)[0].state == "paid"
    assert world.invoices(other)[0].state == "paid"


def test_revoked_credentials_pause_billing_and_it_resumes_when_they_work_again(world: World):
    sub_id = world.subscriber()
    world.gateway.authorized = False
    world.tick()
    assert world.status()["paused"]["reason"] == "unauthorized"
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "open" and invoice.soft_failures == 0
    world.tick()  # the probe still gets 401: stays paused
    assert world.status()["paused"] is not None
    world.gateway.authorized = True
    world.tick()
    assert world.status()["paused"] is None
    assert world.invoices(sub_id)[0].state == "paid"


def test_an_unknown_outcome_blocks_the_invoice_until_an_operator_resolves_it(world: World):
    sub_id = world.subscriber(script=["unknown", "00"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "review"
    assert world.status()["review"] == 1
    world.advance(days=3)
    world.tick()
    assert world.gateway.calls["charge"] == 1  # never retried blindly
    with world.ctx.sessions() as s:
        (item,) = review_queue(s)
    assert item["invoice_id"] == invoice.id and item["order_id"] == f"inv{invoice.id}-a1"
    made = world.gateway.charges[0]
    with pytest.raises(InvalidRequest):
        resolve_review(world.ctx, invoice_id=invoice.id, charged=True)  # the charge id is required
    assert resolve_review(world.ctx, invoice_id=invoice.id, charged=True, tpaga_charge_id=made.id) == "approved"
    assert world.invoices(sub_id)[0].state == "paid"
    no_double_charges(world)


def test_resolving_a_review_as_not_charged_resumes_dunning_without_spending_an_attempt(world: World):
    sub_id = world.subscriber(script=["unknown_no_charge", "00"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "review"
    assert resolve_review(world.ctx, invoice_id=invoice.id, charged=False) == "not_charged"
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "paid" and invoice.soft_failures == 0
    assert [a.state for a in world.attempts(invoice.id)] == ["not_sent", "approved"]


def test_an_operator_cannot_mark_an_invoice_paid_with_someone_elses_charge(world: World):
    sub_a = world.subscriber(script=["unknown"])
    world.subscriber()
    world.tick()
    invoice_a = world.invoices(sub_a)[0]
    other_charge = next(c for c in world.gateway.charges if c.order_id != f"inv{invoice_a.id}-a1")
    with pytest.raises(InvalidRequest, match="another order"):
        resolve_review(world.ctx, invoice_id=invoice_a.id, charged=True, tpaga_charge_id=other_charge.id)
    assert world.invoices(sub_a)[0].state == "review"


def test_a_9999_answer_with_a_charge_id_is_settled_by_lookup(world: World):
    sub_id = world.subscriber(script=["9999", "00"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "review"
    world.tick()  # reconciliation looks the charge up: declined with 9999 is still unknown
    assert world.invoices(sub_id)[0].state == "review"
    assert world.gateway.calls["get_charge"] >= 1


def test_a_worker_lost_while_sending_leaves_an_unknown_attempt_in_review(world: World):
    sub_id = world.subscriber()
    from billing.services.charging import claims
    from billing.services.invoicing import open_due_invoices

    open_due_invoices(world.ctx)
    invoice_id = world.invoices(sub_id)[0].id
    (claim,), _ = claims.claim_invoices(world.ctx, [invoice_id])  # the worker committed the attempt...
    claims.mark_sending(world.ctx, [claim])  # ...marked it sending, and died before recording the outcome
    assert charge_invoice(world.ctx, invoice_id).outcome == "not_scheduled"
    world.advance(minutes=6)
    assert expire_stuck_attempts(world.ctx) == {"not_sent": 0, "unknown": 1}
    assert world.invoices(sub_id)[0].state == "review"
    assert world.gateway.calls["charge"] == 0


def test_a_worker_lost_before_sending_lets_the_invoice_be_charged_again(world: World):
    sub_id = world.subscriber()
    from billing.services.charging import claims
    from billing.services.invoicing import open_due_invoices

    open_due_invoices(world.ctx)
    invoice_id = world.invoices(sub_id)[0].id
    claims.claim_invoices(world.ctx, [invoice_id])
    world.advance(minutes=6)
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.state == "paid"
    assert [a.state for a in world.attempts(invoice.id)] == ["not_sent", "approved"]


def test_a_trial_delays_the_first_charge_until_it_ends(world: World):
    sub_id = world.subscriber(trial_days=14)
    world.tick()
    assert world.invoices(sub_id) == []
    assert world.subscription(sub_id).status == "trialing"
    world.advance(days=14, minutes=1)
    world.tick()
    assert [i.state for i in world.invoices(sub_id)] == ["paid"]
    assert world.subscription(sub_id).status == "active"


def test_cancel_now_with_refund_inside_the_window_voids_the_last_charge(world: World):
    sub_id = world.subscriber()
    world.tick()
    world.advance(hours=2)
    result = cancel_subscription(world.ctx, subscription_id=sub_id, refund_last_charge=True)
    assert result["refund"]["state"] == "requested"
    world.tick()
    with world.ctx.sessions() as s:
        refund = s.execute(select(Refund)).scalar_one()
    assert refund.state == "voided"
    assert world.gateway.voided == {world.gateway.charges[0].id}
    world.advance(days=40)
    world.tick()
    assert len(world.invoices(sub_id)) == 1  # no renewals after cancelling


def test_a_refund_requested_after_the_window_is_expired_without_calling_tpaga(world: World):
    sub_id = world.subscriber()
    world.tick()
    world.advance(hours=25)
    invoice_id = world.invoices(sub_id)[0].id
    outcome = request_refund(world.ctx, invoice_id=invoice_id, reason="customer asked")
    assert outcome.state == "expired"
    assert world.gateway.calls["refund"] == 0


def test_a_refund_whose_deadline_passes_before_it_runs_is_expired_without_calling_tpaga(world: World):
    sub_id = world.subscriber()
    world.tick()
    invoice_id = world.invoices(sub_id)[0].id
    outcome = request_refund(world.ctx, invoice_id=invoice_id, reason="duplicate signup")
    world.advance(hours=24)
    assert execute_refund(world.ctx, outcome.refund_id).state == "expired"
    assert world.gateway.calls["refund"] == 0


def test_refund_requests_are_idempotent_per_charge(world: World):
    sub_id = world.subscriber()
    world.tick()
    invoice_id = world.invoices(sub_id)[0].id
    first = request_refund(world.ctx, invoice_id=invoice_id, reason="a")
    second = request_refund(world.ctx, invoice_id=invoice_id, reason="b")
    assert first.refund_id == second.refund_id and first.created and not second.created
    world.tick()
    world.tick()
    assert world.gateway.calls["refund"] == 1


def test_cancel_at_period_end_stops_renewal_but_keeps_the_paid_period(world: World):
    sub_id = world.subscriber()
    world.tick()
    cancel_subscription(world.ctx, subscription_id=sub_id, at_period_end=True)
    assert world.subscription(sub_id).status == "active"
    world.advance(days=29)
    world.tick()
    assert world.subscription(sub_id).status == "canceled"
    assert len(world.invoices(sub_id)) == 1


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda w: charge_invoice(w.ctx, 999), NotFound),
        (lambda w: request_refund(w.ctx, invoice_id=999, reason="x"), NotFound),
        (lambda w: request_refund(w.ctx, invoice_id=1, reason=""), InvalidRequest),
        (lambda w: cancel_subscription(w.ctx, subscription_id=999), NotFound),
        (lambda w: cancel_subscription(w.ctx, subscription_id=1, at_period_end="yes"), InvalidRequest),
        (lambda w: catalog.attach_card(w.ctx, customer_id=999, token="t"), NotFound),
        (lambda w: catalog.attach_card(w.ctx, customer_id=1, token=" "), InvalidRequest),
        (lambda w: catalog.subscribe(w.ctx, customer_id=999, plan_id=1), NotFound),
        (lambda w: catalog.subscribe(w.ctx, customer_id=1, plan_id=999), NotFound),
        (lambda w: catalog.create_plan(w.ctx, code="x y", name="", amount=Money(100, "COP")), InvalidRequest),
        (lambda w: catalog.create_plan(w.ctx, code="half", name="", amount=Money(150, "COP")), InvalidRequest),
        (lambda w: catalog.create_plan(w.ctx, code="pro", name="", amount=Money(100, "COP")), InvalidRequest),
        (
            lambda w: catalog.create_plan(w.ctx, code="q", name="", amount=Money(100, "COP"), interval="fortnight"),
            InvalidRequest,
        ),
        (lambda w: resolve_review(w.ctx, invoice_id=1, charged=False), InvalidRequest),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(world: World, call, error):
    world.subscriber()
    world.tick()
    before = (world.status(), world.gateway.calls.copy())
    with world.ctx.sessions() as s:
        outbox_before = s.execute(select(func.count(OutboxMessage.id))).scalar_one()
    with pytest.raises(error) as excinfo:
        call(world)
    assert str(excinfo.value)
    assert (world.status(), world.gateway.calls) == before
    with world.ctx.sessions() as s:
        assert s.execute(select(func.count(OutboxMessage.id))).scalar_one() == outbox_before


def test_a_refund_of_an_unpaid_invoice_is_refused(world: World):
    sub_id = world.subscriber(script=["51"])
    world.tick()
    with pytest.raises(InvalidRequest, match="no approved charge"):
        request_refund(world.ctx, invoice_id=world.invoices(sub_id)[0].id, reason="x")
