"""The outbound event stream (docs/events.md): written with each state change, numbered after commit.

`emit` adds an event in the caller's transaction, so an event exists exactly when its change committed. The
event has no offset yet: `sequence` numbers committed events, one sequencer at a time (a row lock on the
stream's counter; a second sequencer skips its turn), in the order it finds them visible. A PostgreSQL sequence
alone would not do: a transaction that took offset 7 may commit after one that took 8, and a consumer that
read "offset > 7" would never see 7. Numbering after commit gives offsets in visibility order, and each
subscription's `subscription_seq` (1, 2, 3 ... without gaps) in the same pass.

The sequencer also fills what never changes once set (the subscription's and customer's external ids, the
customer of a subscription event) and fans each event out to the endpoints that want it (`deliveries`).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import Control, Customer, Delivery, Endpoint, StreamEvent, Subscription
from billing.domain.money import Money
from billing.services.context import Context

OFFSET_KEY = "stream.offset"
# As many as a delivery pass claims (delivery.PASS_SIZE): numbering fewer capped delivery at that many per pass.
SEQUENCE_BATCH = 2000

# Every type an app can receive, each documented in docs/events.md (a test holds the two together). `row`
# refuses any other: a new type is added here and documented before it can be emitted.
CATALOGUE = (
    "customer.created",
    "customer.updated",
    "card.attached",
    "card.unusable",
    "card.expiring",
    "subscription.created",
    "subscription.trial_will_end",
    "subscription.renewal_upcoming",
    "subscription.activated",
    "subscription.past_due",
    "subscription.recovered",
    "subscription.unpaid",
    "subscription.cancel_scheduled",
    "subscription.canceled",
    "subscription.paused",
    "subscription.resumed",
    "invoice.opened",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.in_review",
    "invoice.uncollectible",
    "invoice.voided",
    "refund.voided",
    "refund.expired",
    "refund.rejected",
    "billing.paused",
    "billing.resumed",
    "command.applied",
    "command.rejected",
)
_TYPES = frozenset(CATALOGUE)


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def row(
    now: datetime,
    type: str,
    *,
    subscription_id: int | None = None,
    customer_id: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    """One event as a row for `emit_many`. `data` holds what an app needs to act (docs/events.md): flat ids,
    amounts with currency, codes; never a card id, a token or a key."""
    if type not in _TYPES:
        raise ValueError(f"{type!r} is not in the event catalogue (stream.CATALOGUE, docs/events.md)")
    if subscription_id is not None:
        data["subscription_id"] = subscription_id
    if customer_id is not None:
        data["customer_id"] = customer_id
    return {
        "event_id": new_event_id(),
        "type": type,
        "created_at": now,
        "customer_id": customer_id,
        "subscription_id": subscription_id,
        "data": data,
    }


def emit(session: Session, now: datetime, type: str, **fields: Any) -> None:
    """Add one event in the caller's transaction (see `row` for the fields)."""
    emit_many(session, [row(now, type, **fields)])


def emit_many(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        bulk.insert_rows(session, StreamEvent, rows)


# --- data helpers: the same shapes in every event ----------------------------------------------------------


def iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def money(amount_minor: int, currency: str) -> dict[str, Any]:
    """`amount` as a decimal string in major units (never a float) with its `currency`."""
    return {"amount": str(Money(amount_minor, currency).major), "currency": currency}


def entitlement(active: bool, until: datetime | None) -> dict[str, Any]:
    """Whether the customer should have access now, and until when (when inactive: since when it ended)."""
    return {"active": active, "until": iso(until)}


def subscription_entitlement(sub: Any, now: datetime) -> dict[str, Any]:
    """The entitlement of a subscription row (status, trial_end_at, current_period_end, next_billing_at,
    cancel_at, canceled_at, paused_at), decided here once so that no app re-derives it: a trial and a period
    being collected (past_due) still count; unpaid and canceled do not; a paused subscription keeps what it
    paid for; a scheduled cancel ends access at the cancel time."""
    status = str(sub.status)
    if status == "canceled":
        return entitlement(False, sub.canceled_at or now)
    if status == "unpaid":
        return entitlement(False, now)
    if status == "trialing":
        return entitlement(True, sub.cancel_at or sub.trial_end_at)
    until = sub.current_period_end or sub.next_billing_at
    if sub.cancel_at is not None:
        until = sub.cancel_at
    if sub.paused_at is not None:
        return entitlement(sub.current_period_end is not None and sub.current_period_end > now, until)
    return entitlement(True, until)


# --- numbering ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Unnumbered:
    """An event being numbered: the columns the sequencer reads and writes, without an ORM object (loading
    a thousand StreamEvent instances per pass was a sixth of the delivery loop's CPU)."""

    id: int
    type: str
    subscription_id: int | None
    customer_id: int | None
    data: dict[str, Any]
    stream_offset: int | None = None


def sequence(ctx: Context, *, limit: int = SEQUENCE_BATCH) -> int:
    """Number up to `limit` committed events and fan them out; how many were numbered (0 when another
    sequencer holds the counter)."""
    now = ctx.clock.now()
    table = StreamEvent.__table__
    with ctx.unit_of_work() as session:
        last = _lock_counter(session, now)
        if last is None:
            return 0
        events = [
            _Unnumbered(r.id, r.type, r.subscription_id, r.customer_id, r.data)
            for r in session.execute(
                select(table.c.id, table.c.type, table.c.subscription_id, table.c.customer_id, table.c.data)
                .where(table.c.stream_offset.is_(None))
                .order_by(table.c.id)
                .limit(limit)
            )
        ]
        if not events:
            return 0
        _enrich(session, events)
        seqs = _last_seqs(session, {e.subscription_id for e in events if e.subscription_id is not None})
        numbered: list[dict[str, Any]] = []
        for event in events:
            last += 1
            event.stream_offset = last
            subscription_seq = None
            if event.subscription_id is not None:
                seqs[event.subscription_id] += 1
                subscription_seq = seqs[event.subscription_id]
            numbered.append(
                {
                    "id": event.id,
                    "stream_offset": last,
                    "subscription_seq": subscription_seq,
                    "customer_id": event.customer_id,
                    "data": event.data,
                }
            )
        # One statement for the pass (UPDATE ... FROM unnest on PostgreSQL), not one per event.
        bulk.update_rows(session, StreamEvent, numbered)
        session.execute(update(Control).where(Control.key == OFFSET_KEY).values(value=str(last), updated_at=now))
        _fan_out(session, now, events)
        return len(events)


def _lock_counter(session: Session, now: datetime, *, wait: bool = False) -> int | None:
    """The last offset given, with its row locked for this transaction; None if another sequencer has it
    (unless `wait`)."""
    bulk.insert_rows(
        session,
        Control,
        [{"key": OFFSET_KEY, "value": "0", "updated_at": now}],
        on_conflict_do_nothing=True,
        conflict_columns=("key",),
    )
    value = session.execute(
        select(Control.value).where(Control.key == OFFSET_KEY).with_for_update(skip_locked=not wait)
    ).scalar_one_or_none()
    return None if value is None else int(value)


def hold_numbering(session: Session, now: datetime) -> int:
    """Wait for a sequencer at work and keep the next one out until this transaction ends; the last offset
    given. Adding or removing an endpoint under it: a sequencer that read the endpoints before the change
    committed would otherwise queue nothing for an endpoint added with an older from_offset, or queue for one
    just removed (retried for ever, its events never purged)."""
    return _lock_counter(session, now, wait=True) or 0  # it waited: never None


def _last_seqs(session: Session, subscription_ids: set[int]) -> dict[int, int]:
    seqs: dict[int, int] = defaultdict(int)
    if subscription_ids:
        table = StreamEvent.__table__
        seqs.update(
            (int(sub or 0), int(seq or 0))
            for sub, seq in session.execute(
                select(table.c.subscription_id, func.max(table.c.subscription_seq))
                .where(
                    bulk.id_in(table.c.subscription_id, sorted(subscription_ids), bulk.dialect_of(session)),
                    table.c.subscription_seq.is_not(None),
                )
                .group_by(table.c.subscription_id)
            ).all()
        )
    return seqs


def _enrich(session: Session, events: list[_Unnumbered]) -> None:
    """Fill the ids that never change once set: a subscription's external id and customer, a customer's
    external id. (Array parameters: an IN list of up to a thousand ids rendered per pass cost more CPU.)"""
    dialect = bulk.dialect_of(session)
    sub_ids = {e.subscription_id for e in events if e.subscription_id is not None}
    subscriptions = Subscription.__table__
    subs = (
        {
            r.id: r
            for r in session.execute(
                select(subscriptions.c.id, subscriptions.c.external_id, subscriptions.c.customer_id).where(
                    bulk.id_in(subscriptions.c.id, sorted(sub_ids), dialect)
                )
            )
        }
        if sub_ids
        else {}
    )
    for event in events:
        if event.subscription_id in subs and event.customer_id is None:
            event.customer_id = subs[event.subscription_id].customer_id
    customer_ids = {e.customer_id for e in events if e.customer_id is not None}
    customer_table = Customer.__table__
    customers = (
        dict(
            session.execute(
                select(customer_table.c.id, customer_table.c.merchant_customer_id).where(
                    bulk.id_in(customer_table.c.id, sorted(customer_ids), dialect)
                )
            ).all()
        )
        if customer_ids
        else {}
    )
    for event in events:
        data = dict(event.data or {})
        if event.subscription_id is not None:
            data["subscription_id"] = event.subscription_id
            sub = subs.get(event.subscription_id)
            data["subscription_external_id"] = sub.external_id if sub else None
        if event.customer_id is not None:
            data["customer_id"] = event.customer_id
            data["customer_external_id"] = customers.get(event.customer_id)
        event.data = data


def ordering_key(event: StreamEvent) -> str:
    """Events of one subscription go out in order; events without one, in order per customer."""
    return _key(event.subscription_id, event.customer_id)


def _key(subscription_id: int | None, customer_id: int | None) -> str:
    if subscription_id is not None:
        return f"sub:{subscription_id}"
    if customer_id is not None:
        return f"cus:{customer_id}"
    return "stream"


def wants(endpoint: Endpoint, event_type: str) -> bool:
    return endpoint.event_types is None or event_type in endpoint.event_types


def _fan_out(session: Session, now: datetime, events: Iterable[_Unnumbered]) -> None:
    endpoints = list(session.execute(select(Endpoint).where(Endpoint.removed_at.is_(None))).scalars())
    rows = [
        {
            "endpoint_id": endpoint.id,
            "stream_offset": event.stream_offset,
            "key": _key(event.subscription_id, event.customer_id),
            "state": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for event in events
        for endpoint in endpoints
        if event.stream_offset is not None
        and event.stream_offset > endpoint.from_offset
        and wants(endpoint, event.type)
    ]
    bulk.insert_rows(session, Delivery, rows)


# --- reading ------------------------------------------------------------------------------------------------


def body(event: StreamEvent) -> dict[str, Any]:
    """The event as apps receive it (webhook body, Celery kwarg `event`, `billing events list --json`)."""
    out: dict[str, Any] = {
        "id": event.event_id,
        "type": event.type,
        "created_at": event.created_at.isoformat(),
        "offset": event.stream_offset,
    }
    if event.subscription_id is not None:
        out["subscription_id"] = event.subscription_id
        out["subscription_external_id"] = (event.data or {}).get("subscription_external_id")
        out["subscription_seq"] = event.subscription_seq
    out["data"] = event.data or {}
    return out


def encode(event: StreamEvent) -> bytes:
    """The exact bytes sent (and signed): the same for every attempt of the event."""
    return json.dumps(body(event), sort_keys=True, separators=(",", ":"), default=str).encode()


def last_offset(session: Session) -> int:
    value = session.execute(select(Control.value).where(Control.key == OFFSET_KEY)).scalar_one_or_none()
    return int(value) if value is not None else 0


def events_after(
    session: Session,
    offset: int = 0,
    *,
    limit: int = 100,
    types: Sequence[str] | None = None,
    subscription_id: int | None = None,
    since: datetime | None = None,
) -> list[StreamEvent]:
    """Numbered events after `offset`, oldest first."""
    query = select(StreamEvent).where(StreamEvent.stream_offset > offset)
    if types:
        query = query.where(StreamEvent.type.in_(list(types)))
    if subscription_id is not None:
        query = query.where(StreamEvent.subscription_id == subscription_id)
    if since is not None:
        query = query.where(StreamEvent.created_at >= since)
    return list(session.execute(query.order_by(StreamEvent.stream_offset).limit(limit)).scalars())


def unsequenced(ctx: Context) -> bool:
    """Whether committed events wait for their numbers."""
    with ctx.sessions() as session:
        return (
            session.execute(select(StreamEvent.id).where(StreamEvent.stream_offset.is_(None)).limit(1)).first()
            is not None
        )
