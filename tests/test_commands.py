"""Commands by the sender's own ids (issue 13) at the service and task level: the emulator over HTTP, SQLite and
PostgreSQL, real threads for concurrent duplicates. The contract test with real workers is
tests/test_commands_contract.py; the any-interleaving property is tests/test_commands_property.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

import tasks
from billing.db.models import Card, ChargeAttempt, Command, Customer, Event, Invoice, Plan, Subscription
from billing.sandbox.server import SandboxThread
from billing.services import catalog, commands, invoicing
from billing.services.charging import charge_invoice
from billing.services.charging.claims import claim_invoices, mark_sending
from billing.services.errors import InvalidRequest, NotFound, Stale, Waiting
from billing.services.ledger import Meta
from tasks import app
from tasks.errors import TaskInputError
from tests.test_money_path_charges import APPROVES, World, make_world

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def world(sqlite_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(sqlite_url, sandbox)


@pytest.fixture
def pg_world(pg_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(pg_url, sandbox)


def tpaga_requests(world: World, endpoint: str) -> int:
    stats = requests.get(world.emulator.base + "stats", timeout=10).json()
    return int(stats["requests"].get(endpoint, 0))


def token(world: World, number: str = APPROVES) -> str:
    return world.client.tokenize_card(number=number, exp_month=5, exp_year=2035, holder_name="Ana", cvc="123")


def customer(world: World, external_id: str = "cus_1", **kw: Any) -> dict[str, Any]:
    fields = {"email": "ana@example.com", "first_name": "Ana", "last_name": "Gómez", **kw}
    return commands.upsert_customer(world.ctx, external_id=external_id, **fields)


def signed_up(world: World, n: int = 1, **sub: Any) -> dict[str, Any]:
    commands.upsert_plan(world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    customer(world, f"cus_{n}")
    commands.attach_card_result(world.ctx, token=token(world), external_customer_id=f"cus_{n}")
    return commands.create_subscription(
        world.ctx, external_id=f"sub_{n}", external_customer_id=f"cus_{n}", plan_code="gold", **sub
    )


def count(world: World, model: Any, *where: Any) -> int:
    with world.ctx.sessions() as session:
        return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at once in threads; each one's result or exception."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


# --- one sign-up, repeated ------------------------------------------------------------------------------


def test_an_app_signs_a_customer_up_by_its_own_ids_and_every_repeat_returns_the_same_objects(world: World) -> None:
    created = signed_up(world)
    assert created["status"] == "active" and created["changed"] is True
    again = signed_up(world)  # the whole sequence once more: plan, customer, the same card token is new here
    assert again["subscription_id"] == created["subscription_id"] and again["changed"] is False
    assert count(world, Customer) == 1 and count(world, Subscription) == 1
    assert tpaga_requests(world, "POST customer") == 1
    invoicing.open_due_invoices(world.ctx)
    with world.ctx.sessions() as session:
        invoice_id = session.execute(select(Invoice.id)).scalar_one()
    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"


def test_the_same_card_token_delivered_twice_is_associated_once_and_answers_with_the_first_card(world: World) -> None:
    customer(world)
    temp = token(world)
    first = commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_1")
    second = commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_1")
    assert second["card_id"] == first["card_id"] and second["repeat"] is True
    assert tpaga_requests(world, "POST customer/credit_card_token") == 1


def test_a_database_error_after_tpaga_associated_the_card_does_not_lose_the_card(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer(world)
    temp = token(world)
    reschedule = catalog.retry_waiting_invoices

    def connection_lost_once(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(catalog, "retry_waiting_invoices", reschedule)
        raise OperationalError("UPDATE invoices SET due_at=...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(catalog, "retry_waiting_invoices", connection_lost_once)
    # The recording transaction is run again: the card Tpaga associated is kept, the token spent once.
    attached = commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_1")
    assert attached["card_id"] is not None and "repeat" not in attached
    assert count(world, Card) == 1
    assert tpaga_requests(world, "POST customer/credit_card_token") == 1


def test_a_token_given_for_another_customer_is_refused(world: World) -> None:
    customer(world, "cus_1")
    customer(world, "cus_2")
    temp = token(world)
    commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_1")
    with pytest.raises(InvalidRequest, match="already given for another customer"):
        commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_2")


def test_a_repeat_of_upsert_customer_updates_the_local_fields_only(world: World) -> None:
    customer(world, email="ana@example.com")
    result = customer(world, email="ana.gomez@example.com", phone="+573001234567")
    assert result["created"] is False
    with world.ctx.sessions() as session:
        row = session.execute(select(Customer)).scalar_one()
        assert (row.email, row.phone) == ("ana.gomez@example.com", "+573001234567")
    assert tpaga_requests(world, "POST customer") == 1  # Tpaga has no update call


# --- request ids and staleness --------------------------------------------------------------------------


def test_a_repeated_request_id_returns_the_first_outcome_and_other_parameters_are_refused(world: World) -> None:
    meta = Meta(request_id="req-1")
    first = customer(world, meta=meta)
    assert customer(world, meta=meta) == {**first, "repeat": True}
    with pytest.raises(InvalidRequest, match=r"request_id 'req-1' was already used .* with other parameters"):
        customer(world, email="other@example.com", meta=meta)
    with world.ctx.sessions() as session:
        assert session.execute(select(Customer.email)).scalar_one() == "ana@example.com"
        [row] = session.execute(select(Command).where(Command.request_id == "req-1")).scalars()
        assert row.status == "applied"


def test_a_request_id_reused_with_other_parameters_is_recorded_as_rejected(world: World) -> None:
    # The sender learns outcomes from the record (no result backend): a reuse must be there, with its reason.
    customer(world, meta=Meta(request_id="req-1"))
    for _ in range(2):
        with pytest.raises(InvalidRequest, match="with other parameters"):
            customer(world, email="other@example.com", meta=Meta(request_id="req-1"))
    with world.ctx.sessions() as session:
        rejected = [e.data for e in session.execute(select(Event).where(Event.kind == "command.rejected")).scalars()]
        assert session.execute(select(Command.status).where(Command.request_id == "req-1")).scalar_one() == "applied"
    assert (
        rejected
        == [
            {
                "command": "billing.upsert_customer",
                "request_id": "req-1",
                "status": "rejected",
                "reason": "request_id 'req-1' was already used by a billing.upsert_customer with other parameters",
            }
        ]
        * 2
    )


def test_a_refused_request_repeated_is_refused_again_for_the_same_reason(world: World) -> None:
    meta = Meta(request_id="req-bad")
    with pytest.raises(NotFound, match="plan 'nope' does not exist"):
        commands.create_subscription(world.ctx, external_id="s", external_customer_id="c", plan_code="nope", meta=meta)
    customer(world, "c")
    commands.upsert_plan(world.ctx, code="nope", amount="100", currency="COP", interval="month")
    with pytest.raises(InvalidRequest, match="plan 'nope' does not exist"):
        commands.create_subscription(world.ctx, external_id="s", external_customer_id="c", plan_code="nope", meta=meta)
    assert count(world, Subscription) == 0


def test_a_command_issued_before_the_last_applied_change_is_stale_and_changes_nothing(world: World) -> None:
    customer(world, email="new@example.com", meta=Meta(issued_at=T0))
    with pytest.raises(Stale, match="stale: issued at 2026-12-01T08:59:00"):
        customer(world, email="old@example.com", meta=Meta(issued_at=T0 - timedelta(minutes=1)))
    customer(world, email="same-time@example.com", meta=Meta(issued_at=T0))  # equal: not older
    with world.ctx.sessions() as session:
        assert session.execute(select(Customer.email)).scalar_one() == "same-time@example.com"
        statuses = session.execute(select(Command.status).order_by(Command.id)).scalars().all()
        assert statuses == ["applied", "stale", "applied"]
        rejected = session.execute(select(Event).where(Event.kind == "command.rejected")).scalar_one()
        assert rejected.data["status"] == "stale" and rejected.data["command"] == "billing.upsert_customer"


def test_a_late_pause_after_a_resume_is_stale(world: World) -> None:
    signed_up(world)
    commands.resume_subscription(world.ctx, external_subscription_id="sub_1", meta=Meta(issued_at=T0))
    with pytest.raises(Stale):
        commands.pause_subscription(
            world.ctx, external_subscription_id="sub_1", meta=Meta(issued_at=T0 - timedelta(seconds=1))
        )
    assert count(world, Subscription, Subscription.paused_at.is_not(None)) == 0


# --- order ----------------------------------------------------------------------------------------------


def test_a_command_naming_a_customer_not_there_yet_waits_and_then_applies(world: World) -> None:
    commands.upsert_plan(world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    with pytest.raises(Waiting, match="customer 'cus_9' does not exist"):
        commands.create_subscription(world.ctx, external_id="sub_9", external_customer_id="cus_9", plan_code="gold")
    with pytest.raises(Waiting):
        commands.attach_card_result(world.ctx, token=token(world), external_customer_id="cus_9")
    assert count(world, Command, Command.name != "billing.upsert_plan") == 0  # a wait is not an outcome
    customer(world, "cus_9")
    created = commands.create_subscription(
        world.ctx, external_id="sub_9", external_customer_id="cus_9", plan_code="gold"
    )
    assert created["changed"] is True


def test_a_subscription_created_before_its_card_is_charged_when_the_card_arrives(world: World) -> None:
    commands.upsert_plan(world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    customer(world)
    commands.create_subscription(world.ctx, external_id="sub_1", external_customer_id="cus_1", plan_code="gold")
    invoicing.open_due_invoices(world.ctx)
    with world.ctx.sessions() as session:
        invoice_id = session.execute(select(Invoice.id)).scalar_one()
    assert charge_invoice(world.ctx, invoice_id).outcome == "no_usable_card"
    commands.attach_card_result(world.ctx, token=token(world), external_customer_id="cus_1")
    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"
    assert world.invoice(invoice_id).state == "paid"


# --- plans ----------------------------------------------------------------------------------------------


def test_plan_terms_change_only_while_no_subscription_uses_the_plan(world: World) -> None:
    commands.upsert_plan(world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    changed = commands.upsert_plan(world.ctx, code="gold", amount="50000", currency="COP", interval="month")
    assert changed["changed"] is True and changed["created"] is False
    same = commands.upsert_plan(world.ctx, code="gold", amount="50000.00", currency="cop", interval="month")
    assert same["changed"] is False
    customer(world)
    commands.create_subscription(world.ctx, external_id="s1", external_customer_id="cus_1", plan_code="gold")
    with pytest.raises(InvalidRequest, match=r"plan 'gold' is in use .* make a new code"):
        commands.upsert_plan(world.ctx, code="gold", amount="60000", currency="COP", interval="month")
    with world.ctx.sessions() as session:
        assert session.execute(select(Plan.amount_minor).where(Plan.code == "gold")).scalar_one() == 5_000_000


def test_the_same_subscription_id_with_other_terms_is_refused(world: World) -> None:
    signed_up(world)
    with pytest.raises(InvalidRequest, match="exists with other terms"):
        commands.create_subscription(
            world.ctx, external_id="sub_1", external_customer_id="cus_1", plan_code="gold", trial_days=7
        )


# --- pause and resume -----------------------------------------------------------------------------------


def test_a_paused_subscription_opens_no_invoice_and_resuming_bills_only_the_current_period(world: World) -> None:
    created = signed_up(world)
    invoicing.open_due_invoices(world.ctx)  # period 0
    commands.pause_subscription(world.ctx, external_subscription_id="sub_1")
    world.clock.advance(timedelta(days=75))  # periods 1 and 2 start while paused
    assert invoicing.open_due_invoices(world.ctx) == 0
    anchor = world.subscription(created["subscription_id"]).anchor_at
    resumed = commands.resume_subscription(world.ctx, external_subscription_id="sub_1")
    assert resumed["changed"] is True and resumed["paused"] is False
    assert invoicing.open_due_invoices(world.ctx) == 1
    with world.ctx.sessions() as session:
        periods = session.execute(select(Invoice.period_index).order_by(Invoice.period_index)).scalars().all()
        sub = session.get_one(Subscription, created["subscription_id"])
        assert periods == [0, 2]  # period 1 was skipped while paused, never billed
        assert sub.next_period_index == 3
        assert sub.anchor_at == anchor  # the billing day stays


def test_pausing_keeps_an_open_invoice_waiting_and_stops_a_charge_claimed_but_not_sent(world: World) -> None:
    signed_up(world)
    invoicing.open_due_invoices(world.ctx)
    with world.ctx.sessions() as session:
        invoice_id = session.execute(select(Invoice.id)).scalar_one()
    claims, _ = claim_invoices(world.ctx, [invoice_id])
    assert len(claims) == 1
    commands.pause_subscription(world.ctx, external_subscription_id="sub_1")
    sending, lost = mark_sending(world.ctx, claims)
    assert sending == [] and len(lost) == 1
    assert world.emulator.charges() == []
    assert charge_invoice(world.ctx, invoice_id).outcome == "not_scheduled"
    assert world.attempts(invoice_id)[0].state == "not_sent"
    commands.resume_subscription(world.ctx, external_subscription_id="sub_1")
    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"


def test_a_subscription_paused_until_a_date_resumes_on_it(world: World) -> None:
    signed_up(world)
    resumes = world.clock.now() + timedelta(days=3)
    commands.pause_subscription(world.ctx, external_subscription_id="sub_1", resumes_at=resumes)
    assert commands.resume_due(world.ctx) == 0
    world.clock.advance(timedelta(days=3, seconds=1))
    assert commands.resume_due(world.ctx) == 1
    assert count(world, Subscription, Subscription.paused_at.is_(None)) == 1


def test_a_canceled_subscription_cannot_be_paused(world: World) -> None:
    signed_up(world)
    canceled = commands.cancel_subscription(world.ctx, external_subscription_id="sub_1")
    assert canceled["external_id"] == "sub_1" and canceled["status"] == "canceled"
    with pytest.raises(InvalidRequest, match="is canceled"):
        commands.pause_subscription(world.ctx, external_subscription_id="sub_1")


# --- concurrency on PostgreSQL --------------------------------------------------------------------------


def test_two_concurrent_duplicates_of_upsert_customer_create_one_tpaga_customer(pg_world: World) -> None:
    pg_world.emulator.faults(latencyMs=400)  # both are in flight at once
    try:
        results = together(lambda: customer(pg_world), lambda: customer(pg_world))
    finally:
        pg_world.emulator.faults(latencyMs=0)
    done = [r for r in results if isinstance(r, dict)]
    assert len(done) >= 1 and all(isinstance(r, dict | Waiting) for r in results), results
    assert tpaga_requests(pg_world, "POST customer") == 1
    again = customer(pg_world)  # the waiting one's retry
    assert again["customer_id"] == done[0]["customer_id"]
    assert count(pg_world, Customer) == 1


def test_two_concurrent_deliveries_of_one_token_associate_it_once(pg_world: World) -> None:
    customer(pg_world)
    temp = token(pg_world)
    pg_world.emulator.faults(latencyMs=400)
    try:
        results = together(
            lambda: commands.attach_card_result(pg_world.ctx, token=temp, external_customer_id="cus_1"),
            lambda: commands.attach_card_result(pg_world.ctx, token=temp, external_customer_id="cus_1"),
        )
    finally:
        pg_world.emulator.faults(latencyMs=0)
    assert all(isinstance(r, dict | Waiting) for r in results), results
    assert tpaga_requests(pg_world, "POST customer/credit_card_token") == 1
    again = commands.attach_card_result(pg_world.ctx, token=temp, external_customer_id="cus_1")
    assert again["card_id"] == next(r for r in results if isinstance(r, dict))["card_id"]


def test_two_concurrent_create_subscriptions_make_one(pg_world: World) -> None:
    commands.upsert_plan(pg_world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    customer(pg_world)

    def create() -> dict[str, Any]:
        return commands.create_subscription(
            pg_world.ctx, external_id="sub_1", external_customer_id="cus_1", plan_code="gold"
        )

    results = together(create, create, create)
    assert all(isinstance(r, dict) for r in results), results
    assert len({r["subscription_id"] for r in results}) == 1
    assert count(pg_world, Subscription) == 1


# --- bad input through the tasks ------------------------------------------------------------------------


@pytest.fixture
def task_world(world: World) -> Iterator[World]:
    tasks.runtime.use_factory(lambda: world.ctx)
    yield world
    tasks.runtime.use_factory(None)


PLAN = {"code": "gold", "amount": "45000", "currency": "COP", "interval": "month"}
CUSTOMER = {"external_id": "cus_1", "email": "ana@example.com", "first_name": "Ana", "last_name": "Gómez"}
SUBSCRIPTION = {"external_id": "sub_1", "external_customer_id": "cus_1", "plan_code": "gold"}


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("billing.upsert_plan", {**PLAN, "amount": "1.5"}, "COP amounts must be whole pesos, got 1.50 COP"),
        ("billing.upsert_plan", {**PLAN, "amount": 45000}, "amount must be a string, got 45000 (a int)"),
        ("billing.upsert_plan", {**PLAN, "interval": "fortnight"}, "interval must be one of day, week, month, year"),
        ("billing.upsert_plan", {**PLAN, "colour": "red"}, "unexpected argument(s) colour"),
        ("billing.upsert_plan", {"code": "gold"}, "missing required argument(s) amount, currency, interval"),
        ("billing.upsert_customer", {**CUSTOMER, "external_id": "cus 1"}, "external_id must be 1-64 characters"),
        ("billing.upsert_customer", {**CUSTOMER, "external_id": "c" * 65}, "(65 characters)"),
        ("billing.upsert_customer", {**CUSTOMER, "email": "not-an-email"}, "email must be an address"),
        ("billing.upsert_customer", {**CUSTOMER, "request_id": "r" * 129}, "request_id must be 1 to 128 characters"),
        ("billing.upsert_customer", {**CUSTOMER, "issued_at": "2026-12-01T09:00"}, "issued_at must be an ISO 8601"),
        ("billing.create_subscription", {**SUBSCRIPTION, "plan_code": "nope"}, "plan 'nope' does not exist"),
        (
            "billing.create_subscription",
            {**SUBSCRIPTION, "anchor_at": "2026-12-24T00:00:00"},
            "anchor_at must be an ISO 8601 time with a UTC offset",
        ),
        ("billing.create_subscription", {**SUBSCRIPTION, "trial_days": "7"}, "trial_days must be a whole number"),
        ("billing.attach_card", {"token": "tok"}, "give exactly one of customer_id or external_customer_id"),
        ("billing.cancel_subscription", {}, "give exactly one of subscription_id or external_subscription_id"),
        ("billing.pause_subscription", {"external_subscription_id": "a b"}, "external_subscription_id must be 1-64"),
    ],
)
def test_bad_input_is_refused_once_with_a_precise_message_and_changes_nothing(
    task_world: World, name: str, kwargs: dict[str, Any], message: str
) -> None:
    app.tasks["billing.upsert_plan"](**PLAN)
    app.tasks["billing.upsert_customer"](**CUSTOMER)
    before = {model.__name__: count(task_world, model) for model in (Plan, Customer, Subscription, ChargeAttempt)}
    with pytest.raises(TaskInputError) as caught:
        app.tasks[name](**kwargs)
    assert message in str(caught.value)
    assert str(caught.value).startswith(name)
    after = {model.__name__: count(task_world, model) for model in (Plan, Customer, Subscription, ChargeAttempt)}
    assert after == before
    with task_world.ctx.sessions() as session:
        assert session.execute(select(Plan.amount_minor).where(Plan.code == "gold")).scalar_one() == 4_500_000
        assert session.execute(select(Customer.email)).scalar_one() == "ana@example.com"


def test_tpaga_refusing_a_new_customer_leaves_no_row_and_the_refusal_is_recorded(task_world: World) -> None:
    with pytest.raises(TaskInputError, match=r"Tpaga refused the customer \(email\); nothing was created"):
        app.tasks["billing.upsert_customer"](**{**CUSTOMER, "email": "ana@b@example.com", "request_id": "r1"})
    assert count(task_world, Customer) == 0
    assert count(task_world, Command, Command.status == "rejected", Command.request_id == "r1") == 1


def test_a_paused_subscription_canceled_at_period_end_ends_there_without_a_resume(world: World) -> None:
    signed_up(world)
    invoicing.open_due_invoices(world.ctx)
    commands.pause_subscription(world.ctx, external_subscription_id="sub_1")
    scheduled = commands.cancel_subscription(world.ctx, external_subscription_id="sub_1", at_period_end=True)
    assert scheduled["status"] != "canceled" and scheduled["cancel_at"]
    world.clock.advance(timedelta(days=32))
    commands.resume_due(world.ctx)
    assert count(world, Subscription, Subscription.status == "canceled") == 1
    assert invoicing.open_due_invoices(world.ctx) == 0
