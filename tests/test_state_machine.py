"""The checked state machine (issue 11, §1): every allowed transition of attempts, invoices, subscriptions and
refunds is made, every other one is refused, changes nothing and leaves a `state.conflict` event, on SQLite and
PostgreSQL. The tables themselves are checked first, as pure data."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db import cas, migrate
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Card, ChargeAttempt, Customer, Event, Invoice, Plan, Refund, Subscription
from billing.domain.states import (
    ATTEMPT_TRANSITIONS,
    INVOICE_TRANSITIONS,
    REFUND_TRANSITIONS,
    SUBSCRIPTION_TRANSITIONS,
    AttemptState,
    InvoiceState,
    RefundState,
    SubscriptionStatus,
    can_transition,
    sources,
)

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
TABLES: dict[type[StrEnum], dict[Any, frozenset[Any]]] = {
    AttemptState: ATTEMPT_TRANSITIONS,
    InvoiceState: INVOICE_TRANSITIONS,
    SubscriptionStatus: SUBSCRIPTION_TRANSITIONS,
    RefundState: REFUND_TRANSITIONS,
}
MODEL_OF = {AttemptState: ChargeAttempt, InvoiceState: Invoice, SubscriptionStatus: Subscription, RefundState: Refund}


@pytest.mark.parametrize("states", list(TABLES), ids=lambda e: e.__name__)
def test_every_state_has_a_row_and_no_state_changes_to_itself(states: type[StrEnum]) -> None:
    table = TABLES[states]
    assert set(table) == set(states)
    for old, targets in table.items():
        assert targets <= set(states)
        assert old not in targets


@pytest.mark.parametrize("states", list(TABLES), ids=lambda e: e.__name__)
def test_sources_are_exactly_the_states_the_table_lets_change_to_a_state(states: type[StrEnum]) -> None:
    table = TABLES[states]
    for new in states:
        assert set(sources(table, new)) == {old for old in states if can_transition(table, old, new)}


def test_money_states_are_terminal() -> None:
    assert ATTEMPT_TRANSITIONS[AttemptState.APPROVED] == frozenset()
    assert ATTEMPT_TRANSITIONS[AttemptState.DUPLICATE] == frozenset()
    assert INVOICE_TRANSITIONS[InvoiceState.PAID] == frozenset()
    assert SUBSCRIPTION_TRANSITIONS[SubscriptionStatus.CANCELED] == frozenset()
    for done in (RefundState.VOIDED, RefundState.REJECTED, RefundState.EXPIRED):
        assert REFUND_TRANSITIONS[done] == frozenset()


CASES = [
    (states, old, new) for states in TABLES for old, new in itertools.product(list(states), list(states)) if old != new
]


class Rows:
    """One fresh chain customer -> card -> subscription -> invoice -> attempt -> refund per case."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.plan = Plan(code="p", name="P", amount_minor=100, currency="COP", interval="month", created_at=NOW)
        session.add(self.plan)
        session.flush()
        self.serial = itertools.count()

    def make(self, states: type[StrEnum], state: StrEnum) -> int:
        n = next(self.serial)
        s = self.session
        customer = Customer(created_at=NOW)
        s.add(customer)
        s.flush()
        card = Card(customer_id=customer.id, tpaga_card_id=f"card{n}", status="usable", created_at=NOW)
        s.add(card)
        s.flush()
        sub_state = state if states is SubscriptionStatus else SubscriptionStatus.ACTIVE
        sub = Subscription(
            customer_id=customer.id,
            plan_id=self.plan.id,
            card_id=card.id,
            status=sub_state,
            anchor_at=NOW,
            created_at=NOW,
            updated_at=NOW,
        )
        s.add(sub)
        s.flush()
        invoice = Invoice(
            subscription_id=sub.id,
            period_index=0,
            period_start=NOW,
            period_end=NOW,
            amount_minor=100,
            currency="COP",
            state=state if states is InvoiceState else InvoiceState.PAID,
            created_at=NOW,
            updated_at=NOW,
        )
        s.add(invoice)
        s.flush()
        attempt = ChargeAttempt(
            invoice_id=invoice.id,
            attempt_number=1,
            order_id=f"inv{invoice.id}-a1",
            card_id=card.id,
            amount_minor=100,
            currency="COP",
            state=state if states is AttemptState else AttemptState.APPROVED,
            created_at=NOW,
        )
        s.add(attempt)
        s.flush()
        refund = Refund(
            charge_attempt_id=attempt.id,
            invoice_id=invoice.id,
            reason="r",
            state=state if states is RefundState else RefundState.REQUESTED,
            deadline_at=NOW,
            requested_at=NOW,
        )
        s.add(refund)
        s.flush()
        return {AttemptState: attempt.id, InvoiceState: invoice.id, SubscriptionStatus: sub.id, RefundState: refund.id}[
            states
        ]


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def test_every_transition_is_made_exactly_when_the_table_allows_it(session: Session) -> None:
    rows = Rows(session)
    for states, old, new in CASES:
        model = MODEL_OF[states]
        row_id = rows.make(states, old)
        column = cas.MACHINES[model].column
        allowed = can_transition(TABLES[states], old, new)
        if not sources(TABLES[states], new):
            with pytest.raises(ValueError, match="no state"):
                cas.transition(session, model, row_id, new, now=NOW)
            continue
        made = cas.transition(session, model, row_id, new, now=NOW)
        found = session.execute(select(getattr(model, column)).where(model.id == row_id)).scalar_one()
        assert made is allowed, (states.__name__, old, new)
        assert found == (new if allowed else old), (states.__name__, old, new)
        conflicts = session.execute(
            select(Event.data).where(
                Event.kind == cas.CONFLICT_KIND, getattr(Event, cas.MACHINES[model].event_key) == row_id
            )
        ).scalars()
        assert [c["found"] for c in conflicts] == ([] if allowed else [str(old)]), (states.__name__, old, new)
    session.rollback()


def test_a_batch_transition_moves_the_allowed_rows_and_says_where_each_came_from(session: Session) -> None:
    rows = Rows(session)
    ids = {state: rows.make(AttemptState, state) for state in AttemptState}
    moved = cas.transition_rows(
        session, ChargeAttempt, [{"id": i, "error_code": "00"} for i in ids.values()], AttemptState.APPROVED, now=NOW
    )
    assert moved == {ids[s]: s for s in sources(ATTEMPT_TRANSITIONS, AttemptState.APPROVED)}
    refused_from = {
        e["found"] for e in session.execute(select(Event.data).where(Event.kind == cas.CONFLICT_KIND)).scalars()
    }
    # a row already in the target state is a repeat (a redelivery), not a conflict
    assert refused_from == {str(s) for s in AttemptState} - {str(s) for s in moved.values()} - {"approved"}
    session.rollback()
