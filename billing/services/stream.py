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
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import Control, Customer, Delivery, Endpoint, StreamEvent, Subscription
from billing.domain.money import Money
from billing.services.context import Context

OFFSET_KEY = "stream.offset"
SEQUENCE_BATCH = 1000

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


def sequence(ctx: Context, *, limit: int = SEQUENCE_BATCH) -> int:
    """Number up to `limit` committed events and fan them out; how many were numbered (0 when another
    sequencer holds the counter)."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        last = _lock_counter(session, now)
        if last is None:
            return 0
        events = list(
            session.execute(
                select(StreamEvent).where(StreamEvent.stream_offset.is_(None)).order_by(StreamEvent.id).limit(limit)
            ).scalars()
        )
        if not events:
            return 0
        with session.no_autoflush:  # the rows are written by one statement below, not by the ORM's flush
            _enrich(session, events)
            seqs = _last_seqs(session, {e.subscription_id for e in events if e.subscription_id is not None})
        numbered: list[dict[str, Any]] = []
        for event in events:
            last += 1
            values: dict[str, Any] = {"b_id": event.id, "stream_offset": last}
            if event.subscription_id is not None:
                seqs[event.subscription_id] += 1
                values["subscription_seq"] = seqs[event.subscription_id]
            values["customer_id"] = event.customer_id
            values["data"] = event.data
            event.stream_offset = last
            event.subscription_seq = values.get("subscription_seq")
            numbered.append(values)
        session.expunge_all()
        # One statement for the pass (UPDATE ... FROM unnest on PostgreSQL), not one per event.
        bulk.update_rows(
            session,
            StreamEvent,
            [
                {
                    "id": v["b_id"],
                    "stream_offset": v["stream_offset"],
                    "subscription_seq": v.get("subscription_seq"),
                    "customer_id": v["customer_id"],
                    "data": v["data"],
                }
                for v in numbered
            ],
        )
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
        seqs.update(
            (int(sub or 0), int(seq or 0))
            for sub, seq in session.execute(
                select(StreamEvent.subscription_id, func.max(StreamEvent.subscription_seq))
                .where(StreamEvent.subscription_id.in_(subscription_ids), StreamEvent.subscription_seq.is_not(None))
                .group_by(StreamEvent.subscription_id)
            ).all()
        )
    return seqs


def _enrich(session: Session, events: list[StreamEvent]) -> None:
    """Fill the ids that never change once set: a subscription's external id and customer, a customer's
    external id."""
    sub_ids = {e.subscription_id for e in events if e.subscription_id is not None}
    subs = (
        {
            r.id: r
            for r in session.execute(
                select(Subscription.id, Subscription.external_id, Subscription.customer_id).where(
                    Subscription.id.in_(sub_ids)
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
    customers = (
        dict(
            session.execute(
                select(Customer.id, Customer.merchant_customer_id).where(Customer.id.in_(customer_ids))
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
    if event.subscription_id is not None:
        return f"sub:{event.subscription_id}"
    if event.customer_id is not None:
        return f"cus:{event.customer_id}"
    return "stream"


def wants(endpoint: Endpoint, event_type: str) -> bool:
    return endpoint.event_types is None or event_type in endpoint.event_types


def _fan_out(session: Session, now: datetime, events: Iterable[StreamEvent]) -> None:
    endpoints = list(session.execute(select(Endpoint).where(Endpoint.removed_at.is_(None))).scalars())
    rows = [
        {
            "endpoint_id": endpoint.id,
            "stream_offset": event.stream_offset,
            "key": ordering_key(event),
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
