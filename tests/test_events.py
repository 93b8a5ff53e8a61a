"""The event catalogue as apps see it: which events a subscription's life produces, in which order, with what
data; docs/events.md documents exactly what the code emits; no event carries a card id, a token or a key.

Service-level: the fake gateway and the test clock (tests/test_services.py's World), the real sequencer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from billing.db.models import Card, Invoice, StreamEvent
from billing.gateway import errors as gw
from billing.services import catalog, commands, notices, stream
from billing.services.errors import InvalidRequest, NotFound
from billing.services.ledger import Meta
from billing.services.pause import resume_billing
from billing.services.refunds import request_refund
from billing.services.subscriptions import cancel_subscription
from tests.test_services import World, make_world

DOCS = Path(__file__).resolve().parent.parent / "docs" / "events.md"


@pytest.fixture
def world(sqlite_url: str) -> Iterator[World]:
    yield make_world(sqlite_url)


def numbered(world: World) -> list[StreamEvent]:
    while stream.sequence(world.ctx):
        pass
    with world.ctx.sessions() as session:
        return stream.events_after(session, 0, limit=100_000)


def of_subscription(world: World, subscription_id: int) -> list[StreamEvent]:
    events = [e for e in numbered(world) if e.subscription_id == subscription_id]
    assert [e.subscription_seq for e in events] == list(range(1, len(events) + 1))
    return events


def types(events: list[StreamEvent]) -> list[str]:
    return [e.type for e in events]


def of_customer(world: World, customer_id: int) -> list[str]:
    """The customer's own events (those of no subscription), in stream order."""
    return [e.type for e in numbered(world) if e.customer_id == customer_id and e.subscription_id is None]


def one(events: list[StreamEvent], type_: str) -> dict[str, Any]:
    [event] = [e for e in events if e.type == type_]
    return event.data


def subscriber_of(world: World, sub_id: int) -> int:
    return world.subscription(sub_id).customer_id


# --- a subscription's life, type by type ---------------------------------------------------------------------


def test_a_sign_up_reads_created_activated_opened_paid(world: World) -> None:
    customer_id, _ = world.customer_with_card()
    sub_id = catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=world.plan_id)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == ["subscription.created", "subscription.activated", "invoice.opened", "invoice.paid"]
    # The card went through the command ledger (without a request_id): its outcome is in the stream too.
    assert of_customer(world, customer_id) == ["customer.created", "card.attached", "command.applied"]
    (invoice,) = world.invoices(sub_id)
    paid = one(events, "invoice.paid")
    assert (paid["invoice_id"], paid["amount"], paid["currency"]) == (invoice.id, "45000.00", "COP")
    assert paid["entitlement"] == {"active": True, "until": invoice.period_end.isoformat()}
    assert one(events, "subscription.activated")["after_trial"] is False
    # The sequencer's flat ids: the customer of a subscription event, and its external ids.
    assert all(e.data["customer_id"] == customer_id and e.data["subscription_id"] == sub_id for e in events)


def test_a_trial_warns_before_it_ends_then_activates_and_charges(world: World) -> None:
    sub_id = world.subscriber(trial_days=14)
    world.tick()
    world.advance(days=10)
    world.tick()
    assert types(of_subscription(world, sub_id)) == ["subscription.created"]  # 4 days left: not yet
    world.advance(days=1, hours=1)
    world.tick()
    world.tick()  # a second scan sends nothing again
    world.advance(days=3)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "subscription.trial_will_end",
        "subscription.activated",
        "invoice.opened",
        "invoice.paid",
    ]
    trial_end = world.subscription(sub_id).trial_end_at
    assert trial_end is not None
    assert one(events, "subscription.created")["entitlement"] == {"active": True, "until": trial_end.isoformat()}
    assert one(events, "subscription.trial_will_end")["trial_end_at"] == trial_end.isoformat()
    assert one(events, "subscription.activated")["after_trial"] is True


def test_a_monthly_renewal_is_announced_a_week_ahead_once(world: World) -> None:
    sub_id = world.subscriber()
    world.tick()
    world.advance(days=20)  # Feb 20: the renewal on Feb 28 is 8 days away
    world.tick()
    world.advance(days=2)
    world.tick()
    world.tick()
    world.advance(days=7)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "subscription.activated",
        "invoice.opened",
        "invoice.paid",
        "subscription.renewal_upcoming",
        "invoice.opened",
        "invoice.paid",
    ]
    second = world.invoices(sub_id)[1]
    notice = one(events, "subscription.renewal_upcoming")
    assert (notice["renews_at"], notice["period_index"], notice["amount"]) == (
        second.period_start.isoformat(),
        1,
        "45000.00",
    )


def test_a_weekly_plan_gets_no_renewal_notice(world: World) -> None:
    from billing.domain.money import Money

    weekly = catalog.create_plan(world.ctx, code="wk", name="Weekly", amount=Money(1_000_000, "COP"), interval="week")
    sub_id = world.subscriber(plan_id=weekly)
    for _ in range(3):
        world.tick()
        world.advance(days=7)
    assert "subscription.renewal_upcoming" not in types(of_subscription(world, sub_id))


def test_a_soft_decline_then_recovery(world: World) -> None:
    sub_id = world.subscriber(script=["51", "00"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    world.advance(days=1, minutes=1)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "subscription.activated",
        "invoice.opened",
        "invoice.payment_failed",
        "subscription.past_due",
        "invoice.paid",
        "subscription.recovered",
    ]
    failed = one(events, "invoice.payment_failed")
    assert failed["error_code"] == "51" and failed["decline_class"] == "soft" and failed["attempt"] == 1
    assert failed["next_retry_at"] == invoice.due_at.isoformat() and failed["needs_new_card"] is False  # type: ignore[union-attr]
    past_due = one(events, "subscription.past_due")
    assert past_due["entitlement"] == {"active": True, "until": invoice.period_end.isoformat()}  # dunning keeps it
    assert one(events, "subscription.recovered")["invoice_id"] == invoice.id


def test_dunning_to_unpaid_ends_the_entitlement(world: World) -> None:
    sub_id = world.subscriber(script=["51"])
    world.tick()
    (invoice,) = world.invoices(sub_id)
    assert invoice.first_failure_at is not None
    for day in (1, 3, 5, 7):
        world.clock.set(invoice.first_failure_at + timedelta(days=day, minutes=1))
        world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "subscription.activated",
        "invoice.opened",
        "invoice.payment_failed",
        "subscription.past_due",
        *["invoice.payment_failed"] * 4,
        "invoice.uncollectible",
        "subscription.unpaid",
    ]
    assert [e.data["attempt"] for e in events if e.type == "invoice.payment_failed"] == [1, 2, 3, 4, 5]
    assert [e.data["next_retry_at"] is None for e in events if e.type == "invoice.payment_failed"][-1]
    assert one(events, "subscription.unpaid")["entitlement"]["active"] is False


def test_a_hard_decline_marks_the_card_unusable_and_asks_for_a_new_one(world: World) -> None:
    customer_id, _ = world.customer_with_card(["43"])
    sub_id = catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=world.plan_id)
    world.tick()
    catalog.attach_card(world.ctx, customer_id=customer_id, token="new-good-card")
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "subscription.activated",
        "invoice.opened",
        "invoice.payment_failed",
        "subscription.past_due",
        "invoice.paid",
        "subscription.recovered",
    ]
    assert one(events, "invoice.payment_failed")["needs_new_card"] is True
    assert one(events, "subscription.past_due")["decline_class"] == "hard"
    assert [t for t in of_customer(world, customer_id) if t.startswith("card.")] == [
        "card.attached",
        "card.unusable",
        "card.attached",
    ]
    [unusable] = [e for e in numbered(world) if e.type == "card.unusable"]
    assert (unusable.data["error_code"], unusable.data["last_four"]) == ("43", "1111")


def test_cancel_now_voids_the_open_invoice_and_refunds_the_last_charge(world: World) -> None:
    sub_id = world.subscriber()
    world.tick()
    world.advance(hours=2)
    cancel_subscription(world.ctx, subscription_id=sub_id, refund_last_charge=True)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events)[-2:] == ["subscription.canceled", "refund.voided"]
    assert one(events, "subscription.canceled")["entitlement"]["active"] is False
    refund = one(events, "refund.voided")
    assert (refund["invoice_id"], refund["amount"]) == (world.invoices(sub_id)[0].id, "45000.00")

    declined = world.subscriber(script=["51"])
    world.tick()
    cancel_subscription(world.ctx, subscription_id=declined)
    assert types(of_subscription(world, declined))[-2:] == ["invoice.voided", "subscription.canceled"]


def test_cancel_at_period_end_keeps_access_until_then(world: World) -> None:
    sub_id = world.subscriber()
    world.tick()
    cancel_subscription(world.ctx, subscription_id=sub_id, at_period_end=True)
    world.advance(days=29)
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events)[-2:] == ["subscription.cancel_scheduled", "subscription.canceled"]
    period_end = world.invoices(sub_id)[0].period_end.isoformat()
    assert one(events, "subscription.cancel_scheduled")["entitlement"] == {"active": True, "until": period_end}
    assert one(events, "subscription.canceled")["reason"] == "period_end"
    assert one(events, "subscription.canceled")["entitlement"] == {"active": False, "until": period_end}


def sign_up_by_command(world: World, name: str) -> int:
    commands.upsert_customer(
        world.ctx, external_id=f"cus-{name}", email="ana@example.com", first_name="Ana", last_name="Ruiz"
    )
    commands.attach_card(world.ctx, external_customer_id=f"cus-{name}", token=f"tok-{name}")
    result = commands.create_subscription(
        world.ctx,
        external_id=f"sub-{name}",
        external_customer_id=f"cus-{name}",
        plan_code="pro",
        meta=Meta(request_id=f"req-create-{name}"),
    )
    return int(result["subscription_id"])


def test_pause_and_resume_by_command_with_each_command_s_outcome(world: World) -> None:
    sub_id = sign_up_by_command(world, "p")
    world.tick()
    commands.pause_subscription(world.ctx, external_subscription_id="sub-p", meta=Meta(request_id="req-pause"))
    world.advance(days=40)
    world.tick()
    commands.resume_subscription(world.ctx, external_subscription_id="sub-p", meta=Meta(request_id="req-resume"))
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events) == [
        "subscription.created",
        "command.applied",
        "subscription.activated",
        "invoice.opened",
        "invoice.paid",
        "subscription.paused",
        "command.applied",
        "subscription.resumed",
        "command.applied",
        "invoice.opened",  # the period that contains the resume (the skipped one is never billed)
        "invoice.paid",
    ]
    applied = [e.data for e in events if e.type == "command.applied"]
    assert [(a["command"], a["request_id"]) for a in applied] == [
        ("billing.create_subscription", "req-create-p"),
        ("billing.pause_subscription", "req-pause"),
        ("billing.resume_subscription", "req-resume"),
    ]
    assert all(e.data["subscription_external_id"] == "sub-p" for e in events)
    paused = one(events, "subscription.paused")
    assert paused["entitlement"] == {"active": True, "until": world.invoices(sub_id)[0].period_end.isoformat()}


def test_a_refused_command_says_so_with_its_request_id(world: World) -> None:
    with pytest.raises(NotFound):
        commands.create_subscription(
            world.ctx, external_id="s1", external_customer_id="c1", plan_code="nope", meta=Meta(request_id="r-1")
        )
    [event] = [e for e in numbered(world) if e.type == "command.rejected"]
    assert (event.data["request_id"], event.data["status"], event.data["result"]) == ("r-1", "rejected", None)
    assert "does not exist" in event.data["reason"]


def refuse_voids(charge_id: str) -> Any:
    raise gw.RefundRejectedError("not refundable", charge=None)


def test_refunds_expired_and_rejected(world: World) -> None:
    late = world.subscriber()
    world.tick()
    world.advance(hours=25)
    request_refund(world.ctx, invoice_id=world.invoices(late)[0].id, reason="too late")
    refused = world.subscriber()
    world.tick()
    world.gateway.refund = refuse_voids  # type: ignore[method-assign]
    request_refund(world.ctx, invoice_id=world.invoices(refused)[0].id, reason="asked")
    world.tick()
    assert types(of_subscription(world, late))[-1] == "refund.expired"
    assert types(of_subscription(world, refused))[-1] == "refund.rejected"


def test_a_billing_pause_and_its_resume_are_events_of_no_subscription(world: World) -> None:
    world.subscriber(script=["5003", "00"])
    world.tick()
    assert resume_billing(world.ctx)
    paused = [e for e in numbered(world) if e.type.startswith("billing.")]
    assert [(e.type, e.subscription_id, e.customer_id) for e in paused] == [
        ("billing.paused", None, None),
        ("billing.resumed", None, None),
    ]
    assert paused[0].data["reason"] == "merchant_decline" and paused[0].data["error_code"] == "5003"


def test_an_unknown_outcome_puts_the_invoice_in_review(world: World) -> None:
    sub_id = world.subscriber(script=["unknown"])
    world.tick()
    events = of_subscription(world, sub_id)
    assert types(events)[-1] == "invoice.in_review"
    assert one(events, "invoice.in_review")["reason"] == "charge outcome unknown: dropped"


def test_a_customer_update_names_what_changed_and_a_repeat_sends_nothing(world: World) -> None:
    for last_name in ("Ruiz", "Ruiz", "Gómez"):
        commands.upsert_customer(
            world.ctx, external_id="c-u", email="ana@example.com", first_name="Ana", last_name=last_name
        )
    events = [e for e in numbered(world) if e.type.startswith("customer.")]
    assert [e.type for e in events] == ["customer.created", "customer.updated"]
    assert events[1].data["changed"] == ["last_name"] and events[1].data["last_name"] == "Gómez"
    assert events[1].data["customer_external_id"] == "c-u"


def test_an_expiring_card_in_use_is_announced_once_a_month_ahead(sqlite_url: str) -> None:
    world = make_world(sqlite_url)
    world.clock.set(datetime(2030, 11, 20, 12, tzinfo=UTC))  # the fake's cards expire 12/2030
    customer_id, _ = world.customer_with_card()
    catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=world.plan_id)
    world.customer_with_card()  # a card no subscription uses: no notice
    world.tick()
    assert "card.expiring" not in of_customer(world, customer_id)  # Jan 1 is 42 days away
    world.clock.set(datetime(2030, 12, 5, tzinfo=UTC))
    world.tick()
    world.tick()
    assert of_customer(world, customer_id).count("card.expiring") == 1
    [event] = [e for e in numbered(world) if e.type == "card.expiring"]
    assert (event.data["exp_month"], event.data["exp_year"]) == (12, 2030)
    assert event.data["expires_at"] == "2031-01-01T05:00:00+00:00"  # midnight in Bogota


def test_two_scans_at_once_send_each_notice_once(pg_url: str) -> None:
    """The compare-and-set on the notice columns: concurrent scans on PostgreSQL split, never repeat."""
    import threading

    world = make_world(pg_url)
    subs = [world.subscriber(trial_days=5) for _ in range(20)]
    world.advance(days=3)
    barrier = threading.Barrier(4)
    counts: list[dict[str, int]] = []

    def scan() -> None:
        barrier.wait()
        counts.append(notices.send_notices(world.ctx))

    threads = [threading.Thread(target=scan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(c["trial_will_end"] for c in counts) == len(subs)
    notices_sent = [e.subscription_id for e in numbered(world) if e.type == "subscription.trial_will_end"]
    world.ctx.sessions.kw["bind"].dispose()
    assert sorted(notices_sent) == sorted(subs)


def test_an_uncatalogued_type_is_refused() -> None:
    with pytest.raises(ValueError, match="catalogue"):
        stream.row(datetime.now(UTC), "invoice.exploded", subscription_id=1)


# --- the catalogue, the docs and the data rules over one month of everything ---------------------------------


def everything(world: World) -> None:
    """A month of billing that emits every type of the catalogue."""
    world.subscriber()  # sign-up, paid
    world.subscriber(script=["51", "00"])  # decline, then recovery
    world.subscriber(script=["51"])  # dunning to unpaid
    world.subscriber(script=["43"])  # hard decline: card unusable
    world.subscriber(trial_days=5)  # trial: its notice, its end
    world.subscriber(script=["unknown"])  # review
    world.subscriber(script=["5003", "00"])  # billing paused
    sign_up_by_command(world, "x")
    commands.upsert_customer(
        world.ctx, external_id="cus-x", email="ana@example.com", first_name="Ana", last_name="Gómez"
    )
    with pytest.raises(InvalidRequest):
        commands.pause_subscription(
            world.ctx, external_subscription_id="sub-x", resumes_at=datetime(2000, 1, 1, tzinfo=UTC)
        )
    world.tick()
    resume_billing(world.ctx)
    world.tick()
    commands.pause_subscription(world.ctx, external_subscription_id="sub-x")
    commands.resume_subscription(world.ctx, external_subscription_id="sub-x")
    with world.ctx.sessions() as session:
        paid = list(session.execute(select(Invoice.id).where(Invoice.state == "paid").order_by(Invoice.id)).scalars())
    request_refund(world.ctx, invoice_id=paid[0], reason="customer asked")  # voided by the tick
    scheduled = world.subscriber()
    canceled = world.subscriber()
    world.tick()
    cancel_subscription(world.ctx, subscription_id=scheduled, at_period_end=True)
    cancel_subscription(world.ctx, subscription_id=canceled)
    declined_voided = world.subscriber(script=["51"])
    world.tick()
    cancel_subscription(world.ctx, subscription_id=declined_voided)
    real_refund = world.gateway.refund
    world.gateway.refund = refuse_voids  # type: ignore[method-assign]
    request_refund(world.ctx, invoice_id=paid[1], reason="asked twice")
    world.tick()
    world.gateway.refund = real_refund  # type: ignore[method-assign]
    world.advance(days=1, minutes=1)
    world.tick()
    world.advance(hours=1)
    request_refund(world.ctx, invoice_id=paid[2], reason="too late")  # a day after its charge: expired
    for _ in range(4):
        world.advance(days=2)
        world.tick()
    world.advance(days=14)  # a week before Feb 28's renewals
    world.tick()
    world.clock.set(datetime(2030, 12, 5, tzinfo=UTC))  # the fake's cards expire at the end of 2030
    notices.send_notices(world.ctx)


@pytest.fixture
def month(world: World) -> list[StreamEvent]:
    everything(world)
    return numbered(world)


def documented() -> dict[str, dict[str, Any]]:
    """Each `### \\`type\\`` section of docs/events.md and the JSON body that follows it."""
    text = DOCS.read_text()
    sections = re.findall(r"^### `([a-z_.]+)`\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S)
    bodies = {}
    for type_, section in sections:
        match = re.search(r"```json\n(.*?)\n```", section, flags=re.S)
        assert match, f"docs/events.md: {type_} has no example body"
        bodies[type_] = json.loads(match.group(1))
    return bodies


def test_the_docs_document_every_type_in_the_catalogue_with_a_body_of_the_stream_s_shape() -> None:
    bodies = documented()
    assert sorted(bodies) == sorted(stream.CATALOGUE)
    for type_, body in bodies.items():
        assert body["type"] == type_
        expected = {"id", "type", "created_at", "offset", "data"}
        if "subscription_id" in body:
            expected |= {"subscription_id", "subscription_external_id", "subscription_seq"}
        assert set(body) == expected, type_
        assert body["id"].startswith("evt_") and isinstance(body["offset"], int)


# A command's outcome belongs to what the command changed: a subscription, a customer, or neither.
OWNER_KEYS = {"subscription_id", "subscription_external_id", "customer_id", "customer_external_id"}
ANY_OWNER = {"command.applied", "command.rejected"}


def test_every_type_is_emitted_and_its_data_is_what_the_docs_show(month: list[StreamEvent]) -> None:
    assert sorted({e.type for e in month}) == sorted(stream.CATALOGUE)
    bodies = documented()
    for event in month:
        real = stream.body(event)
        doc = bodies[event.type]
        if event.type in ANY_OWNER:
            assert set(real["data"]) - OWNER_KEYS == set(doc["data"]) - OWNER_KEYS, event.type
            continue
        assert set(real["data"]) == set(doc["data"]), event.type
        assert ("subscription_id" in real) == ("subscription_id" in doc), event.type
        if "entitlement" in doc["data"]:
            assert set(real["data"]["entitlement"]) == {"active", "until"}


FORBIDDEN_KEY = re.compile(r"token|secret|password|private|api_?key|^key$|_key$|card_id|^card$", re.I)


def keys_of(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from keys_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from keys_of(item)


def test_no_event_holds_a_card_id_a_token_or_a_key(world: World, month: list[StreamEvent]) -> None:
    bad = sorted({k for e in month for k in keys_of(e.data) if FORBIDDEN_KEY.search(k)})
    assert bad == []
    with world.ctx.sessions() as session:
        tpaga_ids = set(session.execute(select(Card.tpaga_card_id)).scalars())
    tokens = set(world.gateway.scripts) | {"new-good-card", "tok-x"} | {f"tok-{n}" for n in range(20)}
    text = json.dumps([stream.body(e) for e in month], default=str)
    assert tpaga_ids and not [v for v in tpaga_ids | tokens if f'"{v}"' in text]


def test_postgresql_emits_the_same_events_as_sqlite(month: list[StreamEvent], pg_url: str) -> None:
    """The bulk paths differ by dialect (unnest arrays, RETURNING): the same month, the same streams."""
    world = make_world(pg_url)
    everything(world)
    on_pg = numbered(world)
    world.ctx.sessions.kw["bind"].dispose()

    def streams(events: list[StreamEvent]) -> dict[Any, list[tuple[str, int | None]]]:
        out: dict[Any, list[tuple[str, int | None]]] = {}
        for e in events:
            out.setdefault(e.subscription_id or f"cus:{e.customer_id}", []).append((e.type, e.subscription_seq))
        return out

    assert streams(on_pg) == streams(month)
