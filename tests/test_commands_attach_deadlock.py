"""attach_card on PostgreSQL when its recording transaction is a deadlock's victim.

A new card's transaction points the customer's subscriptions at it, then reschedules their open invoices; a
claim locks its invoices, then marks a subscription without a card past due. The two orders can deadlock
(the contract test, tests/test_commands_contract.py, met it with two workers). Tpaga has associated the card
by then and the token is spent: the card must still be recorded, not left `pending` until its lease ends.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError

from billing.db.models import Card, CardToken, Invoice
from billing.sandbox.server import SandboxThread
from billing.services import commands, invoicing
from tests.procs import wait_until
from tests.test_money_path_charges import APPROVES, World, make_world

pytestmark = pytest.mark.postgres


@pytest.fixture
def tagged(pg_url: str, sandbox: SandboxThread) -> Iterator[tuple[World, str, str]]:
    """A world whose connections carry an application_name of their own, to find them in pg_stat_activity."""
    tag = f"attach-deadlock-{uuid.uuid4().hex[:8]}"
    url = f"{pg_url}&application_name={tag}"
    for world in make_world(url, sandbox):
        yield world, url, tag


def test_a_card_whose_recording_was_a_deadlock_victim_is_still_recorded_and_charges_the_invoice(
    tagged: tuple[World, str, str],
) -> None:
    world, url, tag = tagged
    # Given a subscription without a card and its open invoice
    commands.upsert_plan(world.ctx, code="gold", amount="45000", currency="COP", interval="month")
    commands.upsert_customer(world.ctx, external_id="cus_1", email="ana@example.com", first_name="Ana", last_name="G")
    sub = commands.create_subscription(world.ctx, external_id="sub_1", external_customer_id="cus_1", plan_code="gold")
    assert invoicing.open_due_invoices(world.ctx) == 1
    with world.ctx.sessions() as session:
        invoice_id = session.execute(select(Invoice.id)).scalar_one()
    temp = world.client.tokenize_card(number=APPROVES, exp_month=5, exp_year=2035, holder_name="Ana", cvc="123")

    claimer = create_engine(url.replace(tag, f"{tag}-claimer"))
    outcome: list[Any] = []

    def attach() -> None:
        try:
            outcome.append(commands.attach_card_result(world.ctx, token=temp, external_customer_id="cus_1"))
        except BaseException as exc:
            outcome.append(exc)

    try:
        with claimer.connect() as conn:
            with conn.begin():
                # Given a claim holding the invoice's lock
                conn.execute(text("update invoices set updated_at = now() where id = :id"), {"id": invoice_id})
                # When the card is attached meanwhile: Tpaga associates it, its recording waits for the invoice
                thread = threading.Thread(target=attach)
                thread.start()

                def recording_waits() -> Any:
                    return conn.execute(
                        text(
                            "select count(*) from pg_stat_activity where application_name = :a "
                            "and wait_event_type = 'Lock'"
                        ),
                        {"a": tag},
                    ).scalar_one()

                wait_until(recording_waits, "the card's recording waiting for the invoice", 30, 0.05)
                # And the claim goes on to the subscription (no usable card for it: past due)
                with contextlib.suppress(OperationalError):  # if this side is the victim, a claim's task retries
                    conn.execute(
                        text("update subscriptions set updated_at = now() where id = :id"),
                        {"id": sub["subscription_id"]},
                    )
            thread.join(30)
    finally:
        claimer.dispose()

    # Then the card is recorded, its token attached, Tpaga asked once, and the invoice is due for the new card
    assert not thread.is_alive()
    [result] = outcome
    assert isinstance(result, dict), result
    with world.ctx.sessions() as session:
        card = session.execute(select(Card)).scalar_one()
        assert result["card_id"] == card.id
        assert session.execute(select(CardToken.state)).scalar_one() == "attached"
        assert session.get_one(Invoice, invoice_id).due_at is not None
    stats = requests.get(world.emulator.base + "stats", timeout=10).json()
    assert stats["requests"]["POST customer/credit_card_token"] == 1
