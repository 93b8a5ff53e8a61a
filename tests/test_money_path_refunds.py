"""Refunds on the money path, against the bundled emulator over real HTTP (issue 11, defects 5, 8 and 12).

Each test keeps our clock and the emulator's in step (Tpaga measures its void window on its own clock) and
checks the emulator's ledger for what reached Tpaga: a void that Tpaga would refuse must never be sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import select

import tasks
from billing.clock import TestClock
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Base, ChargeAttempt, Event, Invoice, Refund
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import SandboxThread
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, invoicing
from billing.services.charging import charge_invoice
from billing.services.context import Context
from billing.services.errors import InvalidRequest
from billing.services.reconcile import resolve_review
from billing.services.refunds import request_refund
from billing.services.voids import due_refund_ids, execute_refund, expire_refunds
from tasks.errors import TaskInputError

APPROVING = "4111111111111111"
MARGIN = timedelta(minutes=5)


class NoJitter:
    def random(self) -> float:
        return 0.0


@dataclass
class Shop:
    """The product (services, SQL database, TpagaClient) wired to a running emulator."""

    ctx: Context
    clock: TestClock
    client: TpagaClient
    sandbox_url: str
    plan_id: int

    def _sandbox(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.sandbox_url + "__sandbox/" + path
        response = requests.post(url, json=body, timeout=10) if body is not None else requests.get(url, timeout=10)
        response.raise_for_status()
        return response.json()

    def tpaga_now(self) -> datetime:
        return datetime.fromisoformat(self._sandbox("clock")["now"])

    def set_time(self, when: datetime) -> None:
        """Both clocks to `when` (Tpaga's first: it only moves forwards)."""
        self._sandbox("clock", {"now": when.isoformat()})
        self.clock.set(when)

    def set_tpaga_time(self, when: datetime) -> None:
        self._sandbox("clock", {"now": when.isoformat()})

    def advance(self, delta: timedelta) -> None:
        self._sandbox("clock", {"advanceSeconds": delta.total_seconds()})
        self.clock.advance(delta)

    def faults(self, **plan: Any) -> None:
        self._sandbox("faults", plan)

    def ledger(self) -> dict[str, list[dict[str, Any]]]:
        result: dict[str, list[dict[str, Any]]] = self._sandbox("ledger")
        return result

    def open_invoice(self, number: str = APPROVING) -> int:
        customer_id = catalog.create_customer(self.ctx, email="ana@example.com")
        token = self.client.tokenize_card(number=number, exp_month=12, exp_year=2031, holder_name="Ana")
        catalog.attach_card(self.ctx, customer_id=customer_id, token=token)
        sub_id = catalog.subscribe(self.ctx, customer_id=customer_id, plan_id=self.plan_id)
        invoicing.open_due_invoices(self.ctx)
        with self.ctx.sessions() as s:
            return int(s.execute(select(Invoice.id).where(Invoice.subscription_id == sub_id)).scalar_one())

    def paid_invoice(self) -> int:
        invoice_id = self.open_invoice()
        assert str(charge_invoice(self.ctx, invoice_id).outcome) == "approved"
        return invoice_id

    def refund(self, refund_id: int) -> Refund:
        with self.ctx.sessions() as s:
            refund = s.get(Refund, refund_id)
            assert refund is not None
            return refund

    def events(self, kind: str) -> list[Event]:
        with self.ctx.sessions() as s:
            return list(s.execute(select(Event).where(Event.kind == kind)).scalars())

    def run_refunds(self) -> list[str]:
        """What the beat's refund scan does: expire, then execute every due refund."""
        expire_refunds(self.ctx)
        with self.ctx.sessions() as s:
            ids = due_refund_ids(s, self.clock.now())
        return [str(execute_refund(self.ctx, i).state) for i in ids]


@pytest.fixture
def make_shop(sqlite_url: str, sandbox: SandboxThread) -> Iterator[Callable[..., Shop]]:
    built: list[Shop] = []

    def make(server: SandboxThread = sandbox, url: str = sqlite_url, **ctx_fields: Any) -> Shop:
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        client = TpagaClient(
            server.api_url,
            DEFAULT_PRIVATE_KEY,
            DEFAULT_PUBLIC_KEY,
            read_timeout_seconds=5.0,
            retry_attempts=2,
            rng=NoJitter(),
            sleep=lambda _: None,
        )
        tpaga_now = datetime.fromisoformat(requests.get(server.base_url + "__sandbox/clock", timeout=10).json()["now"])
        clock = TestClock(tpaga_now)
        ctx = Context(sessions=make_session_factory(engine), gateway=client, clock=clock, **ctx_fields)
        plan_id = catalog.create_plan(ctx, code="pro", name="Pro", amount=Money(4_500_000, "COP"))
        shop = Shop(ctx, clock, client, server.base_url, plan_id)
        built.append(shop)
        return shop

    yield make
    for shop in built:
        shop.client.close()
        shop.ctx.sessions.kw["bind"].dispose()


def _bogota(day: int, hour: int, minute: int, second: int = 0) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime(2031, 3, day, hour, minute, second, tzinfo=ZoneInfo("America/Bogota"))


# --- D5a: a charge settled later takes Tpaga's approval time -------------------------------------------


@pytest.mark.parametrize(
    ("asked_after", "state", "voids"),
    [
        (timedelta(hours=23, minutes=54), "voided", 1),  # inside the window less the margin: voided
        (timedelta(hours=23, minutes=59), "expired", 0),  # within the margin of Tpaga's deadline
        (timedelta(hours=24, minutes=1), "expired", 0),  # Tpaga would answer 406
    ],
)
def test_a_charge_resolved_20_hours_later_keeps_tpagas_approval_time_for_its_refund_deadline(
    make_shop: Callable[..., Shop], asked_after: timedelta, state: str, voids: int
) -> None:
    shop = make_shop()
    invoice_id = shop.open_invoice()
    shop.faults(nextCharges=["drop"])  # Tpaga approves, the answer is lost: the attempt is unknown
    assert str(charge_invoice(shop.ctx, invoice_id).outcome) == "unknown"
    [charge] = shop.ledger()["charges"]
    approved_at = datetime.fromisoformat(charge["dateCreated"])
    shop.advance(timedelta(hours=20))
    assert resolve_review(shop.ctx, invoice_id=invoice_id, charged=True, tpaga_charge_id=charge["id"]) == "approved"
    with shop.ctx.sessions() as s:
        attempt = s.execute(select(ChargeAttempt).where(ChargeAttempt.invoice_id == invoice_id)).scalar_one()
    assert attempt.approved_at == approved_at

    shop.set_time(approved_at + asked_after)
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    assert shop.refund(outcome.refund_id).deadline_at == approved_at + timedelta(hours=24) - MARGIN
    shop.run_refunds()
    assert shop.refund(outcome.refund_id).state == state
    refunds = shop.ledger()["refunds"]
    assert [r["outcome"] for r in refunds] == ["voided"] * voids  # never a 406


# --- D5b and D5c: the same-day window ------------------------------------------------------------------


@pytest.fixture
def same_day_sandbox(sandbox_factory: Callable[..., SandboxThread]) -> SandboxThread:
    return sandbox_factory(refund_window="same_day")


def test_a_same_day_approval_recorded_just_after_midnight_is_expired_without_calling_tpaga(
    make_shop: Callable[..., Shop], same_day_sandbox: SandboxThread
) -> None:
    shop = make_shop(same_day_sandbox, refund_window="same_day")
    shop.set_time(_bogota(3, 23, 59, 30))
    invoice_id = shop.open_invoice()
    # Tpaga approves at 23:59:50; our recording of its answer is stamped 20 seconds later, after midnight.
    shop.set_tpaga_time(_bogota(3, 23, 59, 50))
    shop.clock.set(_bogota(4, 0, 0, 10))
    assert str(charge_invoice(shop.ctx, invoice_id).outcome) == "approved"
    shop.set_time(_bogota(4, 0, 1))
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    shop.run_refunds()
    assert shop.refund(outcome.refund_id).state == "expired"
    assert shop.ledger()["refunds"] == []  # Tpaga's day ended at midnight: a void would have been a 406


def test_a_same_day_window_is_bogotas_day_whatever_the_billing_time_zone(
    make_shop: Callable[..., Shop], same_day_sandbox: SandboxThread
) -> None:
    shop = make_shop(same_day_sandbox, refund_window="same_day", timezone="UTC")
    shop.set_time(_bogota(3, 20, 0))  # 01:00 UTC on the 4th
    invoice_id = shop.paid_invoice()
    shop.set_time(_bogota(4, 1, 0))  # Tpaga's day (Bogota's 3rd) is over; UTC's 4th is not
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    shop.run_refunds()
    assert shop.refund(outcome.refund_id).state == "expired"
    assert shop.ledger()["refunds"] == []


# --- D8: an unknown refund is retried, then settled by a lookup ----------------------------------------


def test_a_refund_left_unknown_by_5xx_answers_is_retried_after_its_backoff_and_voided(
    make_shop: Callable[..., Shop],
) -> None:
    shop = make_shop()
    invoice_id = shop.paid_invoice()
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    shop.faults(nextRefunds=["5xx", "5xx"])  # both of the client's tries
    assert shop.run_refunds() == ["unknown"]
    refund = shop.refund(outcome.refund_id)
    assert refund.lease_expires_at is not None and refund.lease_expires_at > shop.clock.now()
    assert shop.run_refunds() == []  # not before its backoff
    shop.advance(refund.lease_expires_at - shop.clock.now())
    assert shop.run_refunds() == ["voided"]
    assert [r["outcome"] for r in shop.ledger()["refunds"]] == ["voided"]
    assert shop.run_refunds() == []


def test_a_retried_void_that_finds_the_charge_already_voided_by_its_lost_first_try_is_voided(
    make_shop: Callable[..., Shop],
) -> None:
    shop = make_shop()
    invoice_id = shop.paid_invoice()
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    shop.faults(nextRefunds=["drop", "5xx"])  # the first try voids the charge, both answers are lost
    assert shop.run_refunds() == ["unknown"]
    shop.advance(timedelta(minutes=2))
    assert shop.run_refunds() == ["voided"]  # Tpaga's 406 "already voided" is the earlier try's success
    refund = shop.refund(outcome.refund_id)
    assert (refund.state, refund.http_status) == ("voided", 406)
    assert [r["outcome"] for r in shop.ledger()["refunds"]] == ["voided", "refused"]


@pytest.mark.parametrize(
    ("first_try", "state", "flagged"),
    [
        (["drop", "5xx"], "voided", 0),  # the void landed: the lookup says so
        (["5xx", "5xx"], "expired", 1),  # it never did: expired, and a person must refund by hand
    ],
)
def test_an_unknown_refund_whose_tries_fail_until_its_deadline_is_settled_by_a_lookup(
    make_shop: Callable[..., Shop], first_try: list[str], state: str, flagged: int
) -> None:
    shop = make_shop()
    invoice_id = shop.paid_invoice()
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    shop.faults(nextRefunds=first_try)
    assert shop.run_refunds() == ["unknown"]
    shop.faults(errorRate=1.0)  # every later void answers 5xx; lookups (GET) still answer
    tries = 1
    while shop.refund(outcome.refund_id).state == "unknown" and tries < 50:
        due = shop.refund(outcome.refund_id).lease_expires_at
        assert due is not None
        shop.advance(max(due - shop.clock.now(), timedelta(0)))
        shop.run_refunds()
        tries += 1
    refund = shop.refund(outcome.refund_id)
    assert refund.state == state
    assert tries < 40  # waits doubling from a minute to an hour: about 30 tries in a day, not 1,440
    assert shop.clock.now() >= refund.deadline_at
    assert len(shop.events("refund.flagged")) == flagged
    assert shop.run_refunds() == []


def test_a_refund_whose_worker_was_lost_while_sending_is_tried_again(make_shop: Callable[..., Shop]) -> None:
    shop = make_shop()
    invoice_id = shop.paid_invoice()
    outcome = request_refund(shop.ctx, invoice_id=invoice_id, reason="customer asked")
    with shop.ctx.unit_of_work() as s:  # a worker claimed it (sending) and died before any answer
        from billing.db import cas
        from billing.domain.states import RefundState

        cas.transition(
            s, Refund, outcome.refund_id, RefundState.SENDING, now=shop.clock.now(), lease_expires_at=shop.clock.now()
        )
    shop.advance(timedelta(minutes=1))
    assert shop.run_refunds() == ["voided"]
    assert [r["outcome"] for r in shop.ledger()["refunds"]] == ["voided"]


# --- D12: refund requests that must be refused ---------------------------------------------------------


@pytest.fixture
def pg_shop(make_shop: Callable[..., Shop], pg_url: str) -> Iterator[Shop]:
    shop = make_shop(url=pg_url)
    tasks.runtime.use_factory(lambda: shop.ctx)
    yield shop
    tasks.runtime.use_factory(None)


@pytest.mark.parametrize("reason", ["asked\x00", "line\nbreak", "tab\there", "bell\x07", "c1\x85"])
def test_a_refund_reason_with_a_control_character_is_refused_and_changes_nothing(pg_shop: Shop, reason: str) -> None:
    invoice_id = pg_shop.paid_invoice()
    with pytest.raises(TaskInputError, match="reason must not contain control characters"):
        tasks.app.tasks["billing.request_refund"](invoice_id=invoice_id, reason=reason)
    with pytest.raises(InvalidRequest, match="control characters"):
        request_refund(pg_shop.ctx, invoice_id=invoice_id, reason=reason)
    with pg_shop.ctx.sessions() as s:
        assert s.execute(select(Refund)).first() is None
    assert pg_shop.ledger()["refunds"] == []


def test_a_refund_of_a_declined_charge_is_refused_not_moved_to_the_invoices_approved_one(pg_shop: Shop) -> None:
    invoice_id = pg_shop.open_invoice()
    card = pg_shop.ledger()  # no charge yet: script the card's first charge to decline with a soft code
    assert card["charges"] == []
    with pg_shop.ctx.sessions() as s:
        from billing.db.models import Card

        tpaga_card = s.execute(select(Card.tpaga_card_id)).scalar_one()
    pg_shop._sandbox("script", {"creditCard": tpaga_card, "outcomes": ["51"]})
    assert str(charge_invoice(pg_shop.ctx, invoice_id).outcome) == "declined"
    pg_shop.advance(timedelta(days=1, minutes=5))  # the dunning retry approves
    assert str(charge_invoice(pg_shop.ctx, invoice_id).outcome) == "approved"
    with pg_shop.ctx.sessions() as s:
        declined, approved = s.execute(
            select(ChargeAttempt.id).where(ChargeAttempt.invoice_id == invoice_id).order_by(ChargeAttempt.id)
        ).scalars()
    task = tasks.app.tasks["billing.request_refund"]
    with pytest.raises(TaskInputError, match=f"charge {declined} was not approved"):
        task(charge_id=declined, reason="customer asked")
    with pg_shop.ctx.sessions() as s:
        assert s.execute(select(Refund)).first() is None
    result = task(charge_id=approved, reason="customer asked")
    assert (result["invoice_id"], result["state"]) == (invoice_id, "requested")
