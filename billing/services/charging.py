"""Charging invoices: commit the attempts, call Tpaga between two transactions, record the outcomes.

One code path serves one invoice (`charge_invoice`, the public task) and a batch of them
(`billing.services.batch.charge_invoices`): the phases below take lists, and the single path is a batch of
one. Per invoice, in order:

1. claim (one transaction for the whole batch): take the invoice off the schedule with a compare-and-set
   (`due_at` -> NULL where it is open, due now, not locked by another claimer and with no attempt in flight),
   then write its attempt `pending` with a deterministic orderId;
2. mark `sending` with a lease (one transaction), just before the requests leave;
3. POST the charge (never retried once it may have left);
4. record the outcome (one transaction for the batch, or per wave: see `batch`): approved | declined
   (+ dunning) | unknown (-> review) | not_sent, each a compare-and-set on the attempt's state.

The partial unique indexes on charge_attempts make "two approved attempts" and "two attempts in flight" for
one invoice impossible in the database, whatever the broker delivers twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from billing.db import control
from billing.db.models import Card, ChargeAttempt, Event, Invoice, Plan, Subscription
from billing.domain.declines import DeclineClass
from billing.domain.dunning import Action, decide_after_decline
from billing.domain.money import Money
from billing.domain.states import AttemptState, CardStatus, InvoiceState, SubscriptionStatus
from billing.gateway import errors as gw
from billing.services import bulk, events
from billing.services.context import Context
from billing.services.errors import NotFound

log = logging.getLogger("billing.charging")

T = TypeVar("T")

IN_FLIGHT = (AttemptState.SENDING, AttemptState.UNKNOWN)
OPEN_ATTEMPT_STATES = (AttemptState.PENDING, AttemptState.SENDING, AttemptState.UNKNOWN)
# Hot statements select Core columns: the ORM's compile step is wasted on rows that build no objects.
_ATTEMPTS: Any = ChargeAttempt.__table__
_INVOICES: Any = Invoice.__table__


def _table(model: Any) -> Any:
    return model.__table__


@dataclass(frozen=True)
class ChargeOutcome:
    """What charging one invoice did; small and free of secrets, fit for a task result."""

    invoice_id: int
    outcome: str
    attempt_id: int | None = None
    error_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "invoice_id": self.invoice_id,
            "outcome": self.outcome,
            "attempt_id": self.attempt_id,
            "error_code": self.error_code,
        }


@dataclass(frozen=True)
class Claim:
    """A committed attempt, ready to be sent: everything the gateway call needs."""

    invoice_id: int
    attempt_id: int
    order_id: str
    card_tpaga_id: str
    amount: Money
    description: str


_Claim = Claim  # the name tests and older callers know


class HeldBack(gw.NotSentError):
    """Raised in place of a call the batch decided not to make: provably not sent. `pause` is the reason billing
    was paused by another call of the batch (its invoice is due again as soon as billing resumes), or None
    (retried after the usual not-sent backoff)."""

    def __init__(self, message: str, *, pause: str | None = None) -> None:
        super().__init__(message, operation="charge")
        self.pause = pause


@dataclass(frozen=True)
class Sent:
    """What the gateway made of one claimed attempt: the approved charge, or the error the client raised."""

    claim: Claim
    charge: Any = None
    error: BaseException | None = None


def billing_paused(session: Session) -> dict[str, Any] | None:
    return control.get_pause(session)


def pause_billing(session: Session, now: datetime, reason: str, error_code: str | None) -> None:
    """Stop all charging until an operator (or the gateway probe) resumes it.

    Workers that see a 401 at the same moment all pause: the first one records the pause (and its event), the
    others do nothing. A failed insert here would roll back the caller's transaction, with every charge
    outcome it was recording (a whole batch's), and leave those attempts for the review queue.
    """
    payload = json.dumps({"reason": reason, "error_code": error_code, "since": now.isoformat()})
    if control.insert_if_absent(session, control.PAUSE_KEY, payload, now):
        events.record(session, now, "billing.paused", reason=reason, error_code=error_code)


def resume_billing(ctx: Context) -> bool:
    """Lift a pause; returns whether one was lifted."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        if control.get_pause(session) is None:
            return False
        control.delete_value(session, control.PAUSE_KEY)
        events.record(session, now, "billing.resumed")
        return True


def _cas(session: Session, model: Any, row_id: int, states: tuple[str, ...], **values: Any) -> bool:
    """UPDATE ... WHERE id = :id AND state IN (:states); True when this caller made the change."""
    result = session.execute(
        update(model)
        .where(model.id == row_id, model.state.in_(states))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _move_states(
    session: Session, model: Any, rows: list[dict[str, Any]], states: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Compare-and-set many rows: lock them, keep those still in one of `states`, write each row's values
    ({"id": ..., column: value}); returns the rows written."""
    current = bulk.lock_rows(session, model, [r["id"] for r in rows], "state")
    moved = [r for r in rows if r["id"] in current and current[r["id"]].state in states]
    bulk.update_rows(session, model, moved)
    return moved


def _insert_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """The events of many outcomes in one INSERT (the same rows `events.record` writes one at a time)."""
    bulk.insert_rows(session, Event, rows)
    for row in rows:
        if row["kind"] in events.ALERT_KINDS:
            events.log.warning(
                "ALERT %s invoice=%s attempt=%s %s", row["kind"], row["invoice_id"], row["attempt_id"], row["data"]
            )


def _event(
    now: datetime, kind: str, subscription_id: int | None, invoice_id: int, attempt_id: int, **data: Any
) -> dict[str, Any]:
    return {
        "at": now,
        "kind": kind,
        "subscription_id": subscription_id,
        "invoice_id": invoice_id,
        "attempt_id": attempt_id,
        "refund_id": None,
        "data": data,
    }


# --- the single path ---------------------------------------------------------------------------------------


def charge_invoice(ctx: Context, invoice_id: int) -> ChargeOutcome:
    """Charge one open invoice if it is due now; idempotent under duplicate delivery and concurrency."""
    claim = _claim(ctx, invoice_id)
    if isinstance(claim, ChargeOutcome):
        return claim
    sending, lost = mark_sending(ctx, [claim])
    if not sending:
        return lost[0]
    return record_outcomes(ctx, [call_gateway(ctx, sending[0])])[0]


def _claim(ctx: Context, invoice_id: int) -> Claim | ChargeOutcome:
    """First commit for one invoice: its claim, or why there is none (NotFound for an unknown id)."""
    claims, outcomes = claim_invoices(ctx, [invoice_id])
    if claims:
        return claims[0]
    outcome = outcomes[invoice_id]
    if outcome.outcome == "not_found":
        raise NotFound(f"invoice {invoice_id} does not exist")
    return outcome


# --- phase 1: claim ----------------------------------------------------------------------------------------


def claim_invoices(ctx: Context, invoice_ids: Sequence[int]) -> tuple[list[Claim], dict[int, ChargeOutcome]]:
    """First commit: take the due invoices off the schedule and write their attempts, all in one transaction.

    Returns the claims, and for every other id why it was not claimed (`paused`, `not_found`,
    `already_paid`, `in_review`, `not_scheduled`, `not_due`, `claimed_elsewhere`, `void`, `no_usable_card`).
    """
    ids = list(dict.fromkeys(invoice_ids))
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            return _claim_in(ctx, session, now, ids)
    except IntegrityError:
        # A constraint refused an attempt (a concurrent claimer won): the whole claim rolled back.
        return [], {i: ChargeOutcome(i, "claimed_elsewhere") for i in ids}


def _claim_in(
    ctx: Context, session: Session, now: datetime, ids: list[int]
) -> tuple[list[Claim], dict[int, ChargeOutcome]]:
    if billing_paused(session) is not None:
        return [], {i: ChargeOutcome(i, "paused") for i in ids}
    outcomes: dict[int, ChargeOutcome] = {}
    taken = _take_due(session, ids, now, outcomes)
    if not taken:
        return [], outcomes
    t_inv, t_sub, t_plan, t_card = (_table(m) for m in (Invoice, Subscription, Plan, Card))  # Core, no ORM objects
    rows = session.execute(
        select(
            t_inv.c.id,
            t_inv.c.amount_minor,
            t_inv.c.currency,
            t_inv.c.period_index,
            t_sub.c.id.label("subscription_id"),
            t_sub.c.status,
            t_sub.c.customer_id,
            t_plan.c.name.label("plan_name"),
            t_card.c.id.label("card_id"),
            t_card.c.tpaga_card_id,
            t_card.c.status.label("card_status"),
        )
        .select_from(
            t_inv.join(t_sub, t_sub.c.id == t_inv.c.subscription_id)
            .join(t_plan, t_plan.c.id == t_sub.c.plan_id)
            .outerjoin(t_card, t_card.c.id == t_sub.c.card_id)
        )
        .where(bulk.id_in(t_inv.c.id, taken, bulk.dialect_of(session)))
        .order_by(t_inv.c.id)
    ).all()
    wanted: list[tuple[Any, int, str]] = []  # (row, card id, Tpaga card id)
    for row in rows:
        if row.status == SubscriptionStatus.CANCELED:
            _cas(session, Invoice, row.id, (InvoiceState.OPEN,), state=InvoiceState.VOID, due_at=None, updated_at=now)
            outcomes[row.id] = ChargeOutcome(row.id, "void")
            continue
        card: tuple[int, str] | None = None
        if row.card_id is not None and row.card_status == CardStatus.USABLE:
            card = (row.card_id, row.tpaga_card_id)
        else:
            card = _usable_card_of_customer(session, row.customer_id)
        if card is None:
            _await_card(session, now, row.id, row.subscription_id)
            outcomes[row.id] = ChargeOutcome(row.id, "no_usable_card")
            continue
        wanted.append((row, *card))
    if not wanted:
        return [], outcomes
    numbers: dict[int, int] = dict(
        session.execute(
            select(_ATTEMPTS.c.invoice_id, func.max(_ATTEMPTS.c.attempt_number))
            .where(bulk.id_in(_ATTEMPTS.c.invoice_id, [row.id for row, _, _ in wanted], bulk.dialect_of(session)))
            .group_by(_ATTEMPTS.c.invoice_id)
        ).all()
    )
    values = []
    for row, card_id, _ in wanted:
        number = numbers.get(row.id, 0) + 1
        values.append(
            {
                "invoice_id": row.id,
                "attempt_number": number,
                "order_id": f"inv{row.id}-a{number}",
                "card_id": card_id,
                "amount_minor": row.amount_minor,
                "currency": row.currency,
                "state": AttemptState.PENDING,
                "lease_expires_at": now + ctx.sending_lease,
                "created_at": now,
            }
        )
    # ON CONFLICT DO NOTHING covers every unique index: a partial index refusing a second attempt in flight
    # skips that one invoice instead of failing the batch.
    inserted = dict(
        bulk.insert_rows(session, ChargeAttempt, values, returning=("invoice_id", "id"), on_conflict_do_nothing=True)
    )
    claims: list[Claim] = []
    for (row, _, tpaga_card_id), value in zip(wanted, values, strict=True):
        attempt_id = inserted.get(row.id)
        if attempt_id is None:
            # Put it back on the schedule as we found it (due), for whoever holds its attempt to settle.
            session.execute(
                update(Invoice)
                .where(Invoice.id == row.id, Invoice.state == InvoiceState.OPEN, Invoice.due_at.is_(None))
                .values(due_at=now, updated_at=now)
            )
            outcomes[row.id] = ChargeOutcome(row.id, "claimed_elsewhere")
            continue
        claims.append(
            Claim(
                invoice_id=row.id,
                attempt_id=attempt_id,
                order_id=value["order_id"],
                card_tpaga_id=tpaga_card_id,
                amount=Money(row.amount_minor, row.currency),
                description=f"{row.plan_name} period {row.period_index + 1}",
            )
        )
    return claims, outcomes


def _take_due(session: Session, ids: list[int], now: datetime, outcomes: dict[int, ChargeOutcome]) -> list[int]:
    """Take every id that is open, due now and without an attempt in flight off the schedule (due_at -> NULL),
    skipping rows another claimer holds (PostgreSQL; SQLite serializes writers). The others get their reason
    in `outcomes`."""
    locked = bulk.lock_rows(session, Invoice, ids, "state", "due_at", skip_locked=True)
    due = [i for i in ids if i in locked and _reason(locked[i], now) is None]
    busy = (
        set(
            session.execute(
                select(_ATTEMPTS.c.invoice_id).where(
                    bulk.id_in(_ATTEMPTS.c.invoice_id, due, bulk.dialect_of(session)),
                    _ATTEMPTS.c.state.in_(OPEN_ATTEMPT_STATES),
                )
            ).scalars()
        )
        if due
        else set()
    )
    taken = [i for i in due if i not in busy]
    bulk.update_ids(session, Invoice, taken, due_at=None, updated_at=now)
    # Ids not locked: unknown, or held by another claimer right now (read without waiting for it).
    unlocked = [i for i in ids if i not in locked]
    found = (
        {
            row.id: row
            for row in session.execute(
                select(Invoice.id, Invoice.state, Invoice.due_at).where(
                    bulk.id_in(Invoice.id, unlocked, bulk.dialect_of(session))
                )
            )
        }
        if unlocked
        else {}
    )
    for invoice_id in ids:
        if invoice_id in busy:
            outcomes[invoice_id] = ChargeOutcome(invoice_id, "claimed_elsewhere")
        elif invoice_id in locked:
            reason = _reason(locked[invoice_id], now)
            if reason is not None:
                outcomes[invoice_id] = ChargeOutcome(invoice_id, reason)
        elif invoice_id not in found:
            outcomes[invoice_id] = ChargeOutcome(invoice_id, "not_found")
        else:
            outcomes[invoice_id] = ChargeOutcome(invoice_id, _reason(found[invoice_id], now) or "claimed_elsewhere")
    return taken


def _reason(invoice: Any, now: datetime) -> str | None:
    """Why an invoice (state, due_at) cannot be charged now, or None when it can."""
    if invoice.state != InvoiceState.OPEN:
        return {"paid": "already_paid", "review": "in_review"}.get(invoice.state, str(invoice.state))
    if invoice.due_at is None:
        return "not_scheduled"
    if invoice.due_at > now:
        return "not_due"
    return None


def _usable_card_of_customer(session: Session, customer_id: int) -> tuple[int, str] | None:
    row = session.execute(
        select(Card.id, Card.tpaga_card_id)
        .where(Card.customer_id == customer_id, Card.status == CardStatus.USABLE)
        .order_by(Card.id.desc())
        .limit(1)
    ).first()
    return None if row is None else (row.id, row.tpaga_card_id)


def _usable_card(session: Session, sub: Subscription) -> Card | None:
    if sub.card_id is not None:
        card = session.get(Card, sub.card_id)
        if card is not None and card.status == CardStatus.USABLE:
            return card
    found = _usable_card_of_customer(session, sub.customer_id)
    return None if found is None else session.get(Card, found[0])


def _await_card(session: Session, now: datetime, invoice_id: int, subscription_id: int) -> None:
    """No usable card: the invoice waits off the schedule (attaching a card reschedules it)."""
    session.execute(
        update(Invoice)
        .where(Invoice.id == invoice_id, Invoice.state == InvoiceState.OPEN)
        .values(due_at=None, updated_at=now)
    )
    session.execute(
        update(Subscription)
        .where(Subscription.id == subscription_id, Subscription.status != SubscriptionStatus.CANCELED)
        .values(status=SubscriptionStatus.PAST_DUE, updated_at=now)
    )
    events.record(session, now, "invoice.awaiting_card", subscription_id=subscription_id, invoice_id=invoice_id)


# --- phase 2: in flight ------------------------------------------------------------------------------------


def mark_sending(ctx: Context, claims: Sequence[Claim]) -> tuple[list[Claim], list[ChargeOutcome]]:
    """Second commit: the attempts are in flight with a lease before the requests leave.

    A claim whose attempt is no longer `pending` (reconciliation gave up on it) is `lost_claim`, not sent.
    """
    if not claims:
        return [], []
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        current = bulk.lock_rows(session, ChargeAttempt, [c.attempt_id for c in claims], "state")
        marked = {i for i, row in current.items() if row.state == AttemptState.PENDING}
        bulk.update_ids(
            session,
            ChargeAttempt,
            sorted(marked),
            state=AttemptState.SENDING,
            sent_at=now,
            lease_expires_at=now + ctx.sending_lease,
        )
    sending = [c for c in claims if c.attempt_id in marked]
    lost = [ChargeOutcome(c.invoice_id, "lost_claim", c.attempt_id) for c in claims if c.attempt_id not in marked]
    return sending, lost


# --- phase 3: the request ----------------------------------------------------------------------------------


def _charge_fields(claim: Claim) -> dict[str, Any]:
    return {
        "card_id": claim.card_tpaga_id,
        "amount": claim.amount.major,
        "currency": claim.amount.currency,
        "order_id": claim.order_id,
        "description": claim.description,
    }


def call_gateway(ctx: Context, claim: Claim) -> Sent:
    """POST the charge; never raises (an unexpected error may have charged, and is recorded as unknown)."""
    try:
        charge = ctx.gateway.charge(**_charge_fields(claim))
    except Exception as exc:
        return Sent(claim, error=exc)
    return Sent(claim, charge=charge)


async def call_gateway_async(ctx: Context, claim: Claim) -> Sent:
    """`call_gateway` on the batch's event loop: the gateway's `charge_async` when it has one (the Tpaga client:
    aiohttp, many charges in flight on one thread), else its `charge` on one of the loop's executor threads."""
    fields = _charge_fields(claim)
    charge_async = getattr(ctx.gateway, "charge_async", None)
    try:
        if charge_async is not None:
            charge = await charge_async(**fields)
        else:
            charge = await asyncio.get_running_loop().run_in_executor(None, partial(ctx.gateway.charge, **fields))
    except Exception as exc:
        return Sent(claim, error=exc)
    return Sent(claim, charge=charge)


# --- phase 4: record ---------------------------------------------------------------------------------------


def record_outcomes(ctx: Context, sent: Sequence[Sent]) -> list[ChargeOutcome]:
    """Last commit: every outcome in one transaction, retried through database blips (the calls are made).

    If that transaction fails for another reason (a constraint, a bug), each outcome is recorded in its own
    transaction, so that one bad row does not send every charge of the batch to the review queue; an outcome
    that still cannot be recorded is `unrecorded` (its attempt stays `sending`, and reconciliation flags it).
    """
    if not sent:
        return []
    try:
        return _with_db_retry(_record_all, ctx, sent)
    except OperationalError:
        raise  # the database is unreachable: one transaction per outcome would fail the same way
    except Exception as exc:
        if len(sent) == 1:
            raise
        log.error(
            "recording %d outcomes in one transaction failed (%s); recording them one by one",
            len(sent),
            type(exc).__name__,
        )
    outcomes = []
    for item in sent:
        try:
            outcomes.extend(_with_db_retry(_record_all, ctx, [item]))
        except OperationalError:
            raise
        except Exception as exc:
            log.error(
                "ALERT recording attempt %s failed (%s): it stays sending until reconciliation",
                item.claim.attempt_id,
                type(exc).__name__,
            )
            outcomes.append(ChargeOutcome(item.claim.invoice_id, "unrecorded", item.claim.attempt_id))
    return outcomes


def _record_all(ctx: Context, sent: Sequence[Sent]) -> list[ChargeOutcome]:
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        return record_in(ctx, session, now, sent)


def record_in(ctx: Context, session: Session, now: datetime, sent: Sequence[Sent]) -> list[ChargeOutcome]:
    """Apply the outcomes of the given calls in the caller's transaction; returns them in the same order."""
    approved: list[Sent] = []
    declined: list[Sent] = []
    outcomes: dict[int, ChargeOutcome] = {}
    others: list[Sent] = []
    for item in sent:
        if item.error is None:
            approved.append(item)
        elif isinstance(item.error, gw.DeclinedError):
            declined.append(item)
        else:
            others.append(item)
    # Declines first: a merchant-class decline records its pause (with its errorCode) before the calls the
    # batch held back because of it record theirs.
    outcomes.update(_record_approved(session, now, approved))
    outcomes.update(_record_declines(ctx, session, now, declined))
    for item in others:
        exc, claim = item.error, item.claim
        assert exc is not None
        if isinstance(exc, HeldBack):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, exc.pause)
        elif isinstance(exc, gw.NotSentError):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, None)
        elif isinstance(exc, gw.UnauthorizedError):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, "unauthorized")
        elif isinstance(exc, gw.ValidationError | gw.NotFoundError):
            # Tpaga refused the request itself (no charge made): an operator must look at the stored card.
            outcomes[claim.attempt_id] = _record_rejected(session, now, claim, exc)
        else:  # OutcomeUnknownError and anything unexpected: may have charged
            outcomes[claim.attempt_id] = _record_unknown(session, now, claim, exc)
    return [outcomes[item.claim.attempt_id] for item in sent]


def _with_db_retry(record: Callable[..., T], *args: Any, attempts: int = 5) -> T:
    """Recording an outcome must survive a database blip: the gateway call cannot be taken back."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return record(*args)
        except OperationalError:
            if attempt == attempts:
                raise  # the lease expires and reconciliation flags the attempt as unknown
            log.warning("recording a charge outcome failed (attempt %d); retrying", attempt)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _record_approved(session: Session, now: datetime, items: list[Sent]) -> dict[int, ChargeOutcome]:
    if not items:
        return {}
    # IN_FLIGHT: a late answer still wins over a lease that reconciliation already expired.
    _move_states(
        session,
        ChargeAttempt,
        [
            {
                "id": item.claim.attempt_id,
                "state": AttemptState.APPROVED,
                "tpaga_charge_id": item.charge.id,
                "error_code": item.charge.error_code,
                "error_message": (item.charge.error_message or "")[:255],
                "decline_class": DeclineClass.APPROVED,
                "authorization_code": item.charge.authorization_code,
                "http_status": 201,
                "finished_at": now,
                "approved_at": now,
                "lease_expires_at": None,
            }
            for item in items
        ],
        IN_FLIGHT,
    )
    mark_invoices_paid(session, now, [(item.claim.invoice_id, item.claim.attempt_id) for item in items])
    return {
        item.claim.attempt_id: ChargeOutcome(item.claim.invoice_id, "approved", item.claim.attempt_id, "00")
        for item in items
    }


def mark_invoice_paid(session: Session, now: datetime, invoice_id: int, attempt_id: int) -> None:
    mark_invoices_paid(session, now, [(invoice_id, attempt_id)])


def mark_invoices_paid(session: Session, now: datetime, paid: list[tuple[int, int]]) -> None:
    """Invoices (with their approved attempts) become paid; a subscription with nothing else outstanding is
    active again."""
    dialect = bulk.dialect_of(session)
    invoices = bulk.lock_rows(session, Invoice, [invoice_id for invoice_id, _ in paid], "state", "subscription_id")
    payable = [i for i, row in invoices.items() if row.state in (InvoiceState.OPEN, InvoiceState.REVIEW)]
    bulk.update_ids(
        session, Invoice, payable, state=InvoiceState.PAID, paid_at=now, due_at=None, review_reason=None, updated_at=now
    )
    _insert_events(
        session,
        [_event(now, "charge.approved", invoices[inv].subscription_id, inv, att) for inv, att in paid],
    )
    subscription_ids = sorted({row.subscription_id for row in invoices.values()})
    # The state test sits inside the aggregate, so no index on state can be chosen for it (see
    # billing.services.bulk): the subscriptions' invoices are read through (subscription_id, period_index).
    unsettled = case((_INVOICES.c.state.in_((InvoiceState.OPEN, InvoiceState.REVIEW)), 1), else_=0)
    outstanding = set(
        session.execute(
            select(_INVOICES.c.subscription_id)
            .where(bulk.id_in(_INVOICES.c.subscription_id, subscription_ids, dialect))
            .group_by(_INVOICES.c.subscription_id)
            .having(func.max(unsettled) == 1)
        ).scalars()
    )
    settled = [s for s in subscription_ids if s not in outstanding]
    if settled:
        session.execute(
            update(Subscription)
            .where(
                bulk.id_in(Subscription.id, settled, dialect),
                Subscription.status.in_((SubscriptionStatus.PAST_DUE, SubscriptionStatus.TRIALING)),
            )
            .values(status=SubscriptionStatus.ACTIVE, updated_at=now)
            .execution_options(synchronize_session=False)
        )


def _record_declines(ctx: Context, session: Session, now: datetime, items: list[Sent]) -> dict[int, ChargeOutcome]:
    if not items:
        return {}
    rows = []
    declines = []
    for item in items:
        exc: Any = item.error
        charge = exc.charge
        rows.append(
            {
                "id": item.claim.attempt_id,
                "state": AttemptState.DECLINED,
                "tpaga_charge_id": getattr(charge, "id", None),
                "error_code": exc.error_code,
                "error_message": (getattr(charge, "error_message", None) or "")[:255],
                "decline_class": DeclineClass(exc.decline_class),
                "http_status": exc.http_status,
                "finished_at": now,
                "lease_expires_at": None,
            }
        )
        declines.append((item.claim.invoice_id, item.claim.attempt_id, exc.error_code, DeclineClass(exc.decline_class)))
    _move_states(session, ChargeAttempt, rows, IN_FLIGHT)
    apply_declines(ctx, session, now, declines)
    return {
        item.claim.attempt_id: ChargeOutcome(item.claim.invoice_id, "declined", item.claim.attempt_id, code)
        for item, (_, _, code, _) in zip(items, declines, strict=True)
    }


def apply_decline(
    ctx: Context,
    session: Session,
    now: datetime,
    invoice_id: int,
    attempt_id: int,
    code: str,
    klass: DeclineClass,
) -> None:
    """Dunning after a recorded decline: reschedule, await a new card, pause, or give up."""
    apply_declines(ctx, session, now, [(invoice_id, attempt_id, code, klass)])


# When one batch holds declines of two invoices of the same subscription, the strongest status wins.
_STATUS_RANK = {SubscriptionStatus.PAST_DUE: 1, SubscriptionStatus.UNPAID: 2, SubscriptionStatus.CANCELED: 3}


def apply_declines(
    ctx: Context, session: Session, now: datetime, declines: list[tuple[int, int, str, DeclineClass]]
) -> None:
    """`apply_decline` for many (invoice id, attempt id, errorCode, class): the dunning decision of each, written
    with one statement per kind of change."""
    invoices = bulk.lock_rows(
        session, Invoice, [d[0] for d in declines], "state", "subscription_id", "soft_failures", "first_failure_at"
    )
    card_of: dict[int, int] = dict(
        session.execute(
            select(ChargeAttempt.id, ChargeAttempt.card_id).where(
                bulk.id_in(ChargeAttempt.id, [d[1] for d in declines], bulk.dialect_of(session))
            )
        ).all()
    )
    invoice_updates: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    unusable: dict[int, str] = {}
    subscription_status: dict[int, SubscriptionStatus] = {}
    event_rows = []
    for invoice_id, attempt_id, code, klass in declines:
        invoice = invoices[invoice_id]
        soft = invoice.soft_failures + (1 if klass == DeclineClass.SOFT else 0)
        first_failure = invoice.first_failure_at or now
        decision = decide_after_decline(ctx.policy, klass, first_failure_at=first_failure, soft_failures=soft, now=now)
        values: dict[str, Any] = {"id": invoice_id, "last_error_code": code, "updated_at": now}
        if decision.counts_as_attempt:
            values.update(soft_failures=soft, first_failure_at=first_failure)
        if decision.action == Action.RETRY:
            values["due_at"] = decision.retry_at
        elif decision.action == Action.UNCOLLECTIBLE:
            values.update(state=InvoiceState.UNCOLLECTIBLE, due_at=None)
        elif decision.action == Action.AWAIT_NEW_CARD:
            values["due_at"] = None
        elif decision.action == Action.PAUSE_MERCHANT:
            values["due_at"] = now  # charged again as soon as billing resumes
            pause_billing(session, now, "merchant_decline", code)
        elif decision.action == Action.REVIEW:
            values.update(state=InvoiceState.REVIEW, due_at=None, review_reason=f"errorCode {code!r}")
        if invoice.state in (InvoiceState.OPEN, InvoiceState.REVIEW):
            invoice_updates[tuple(sorted(values))].append(values)
        if decision.card_unusable:
            unusable[card_of[attempt_id]] = code
        status = decision.subscription_status
        if status is not None:
            current = subscription_status.get(invoice.subscription_id)
            if current is None or _STATUS_RANK.get(status, 0) >= _STATUS_RANK.get(current, 0):
                subscription_status[invoice.subscription_id] = status
        event_rows.append(
            _event(
                now,
                "charge.declined",
                invoice.subscription_id,
                invoice_id,
                attempt_id,
                error_code=code,
                decline_class=str(klass),
                action=str(decision.action),
            )
        )
    for rows in invoice_updates.values():
        bulk.update_rows(session, Invoice, rows)
    for card_id, code in sorted(unusable.items()):
        session.execute(update(Card).where(Card.id == card_id).values(status=CardStatus.UNUSABLE, unusable_code=code))
    for subscription_id, status in sorted(subscription_status.items()):
        sub_values: dict[str, Any] = {"status": status, "updated_at": now}
        if status in (SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED):
            sub_values["next_billing_at"] = None
            if status == SubscriptionStatus.CANCELED:
                sub_values["canceled_at"] = now
        session.execute(
            update(Subscription)
            .where(Subscription.id == subscription_id, Subscription.status != SubscriptionStatus.CANCELED)
            .values(**sub_values)
        )
    _insert_events(session, event_rows)


def _record_not_sent(
    ctx: Context, session: Session, now: datetime, claim: Claim, exc: Exception, pause: str | None
) -> ChargeOutcome:
    """The request never reached Tpaga (or Tpaga refused our credentials): no charge, no attempt spent. The
    attempt may still be `pending` when the batch held the call back before marking it sending."""
    invoice_id, attempt_id = claim.invoice_id, claim.attempt_id
    _cas(
        session,
        ChargeAttempt,
        attempt_id,
        (AttemptState.PENDING, *IN_FLIGHT),
        state=AttemptState.NOT_SENT,
        http_status=getattr(exc, "http_status", None),
        error_message=type(exc).__name__,
        finished_at=now,
        lease_expires_at=None,
    )
    retry_at = now if pause else now + ctx.not_sent_backoff
    _cas(session, Invoice, invoice_id, (InvoiceState.OPEN,), due_at=retry_at, updated_at=now)
    if pause:
        pause_billing(session, now, pause, None)
    events.record(
        session,
        now,
        "charge.not_sent",
        invoice_id=invoice_id,
        attempt_id=attempt_id,
        error=type(exc).__name__,
    )
    return ChargeOutcome(invoice_id, "paused" if pause else "not_sent", attempt_id)


def _record_rejected(session: Session, now: datetime, claim: Claim, exc: Exception) -> ChargeOutcome:
    invoice_id, attempt_id = claim.invoice_id, claim.attempt_id
    reason = f"gateway rejected the charge request ({type(exc).__name__})"
    _cas(
        session,
        ChargeAttempt,
        attempt_id,
        IN_FLIGHT,
        state=AttemptState.NOT_SENT,
        http_status=getattr(exc, "http_status", None),
        error_message=reason[:255],
        finished_at=now,
        lease_expires_at=None,
    )
    _cas(
        session,
        Invoice,
        invoice_id,
        (InvoiceState.OPEN,),
        state=InvoiceState.REVIEW,
        due_at=None,
        review_reason=reason[:255],
        updated_at=now,
    )
    events.record(
        session,
        now,
        "attempt.rejected",
        invoice_id=invoice_id,
        attempt_id=attempt_id,
        error=type(exc).__name__,
    )
    return ChargeOutcome(invoice_id, "rejected", attempt_id)


def _record_unknown(session: Session, now: datetime, claim: Claim, exc: BaseException) -> ChargeOutcome:
    reason = getattr(exc, "reason", None) or type(exc).__name__
    mark_unknown(
        session,
        now,
        claim.invoice_id,
        claim.attempt_id,
        str(reason),
        getattr(exc, "charge_id", None),
        getattr(exc, "http_status", None),
        getattr(exc, "error_code", None),
    )
    return ChargeOutcome(claim.invoice_id, "unknown", claim.attempt_id)


def mark_unknown(
    session: Session,
    now: datetime,
    invoice_id: int,
    attempt_id: int,
    reason: str,
    charge_id: str | None,
    http_status: int | None,
    error_code: str | None = None,
) -> bool:
    """Flag an attempt whose outcome is not known; its invoice goes to the review queue."""
    changed = _cas(
        session,
        ChargeAttempt,
        attempt_id,
        (AttemptState.SENDING,),
        state=AttemptState.UNKNOWN,
        unknown_reason=reason[:64],
        error_code=error_code,
        tpaga_charge_id=charge_id,
        http_status=http_status,
        finished_at=now,
        lease_expires_at=None,
    )
    if changed:
        _cas(
            session,
            Invoice,
            invoice_id,
            (InvoiceState.OPEN,),
            state=InvoiceState.REVIEW,
            due_at=None,
            review_reason=f"charge outcome unknown: {reason}"[:255],
            updated_at=now,
        )
        events.record(
            session,
            now,
            "attempt.unknown",
            invoice_id=invoice_id,
            attempt_id=attempt_id,
            reason=reason,
            charge_id_known=charge_id is not None,
        )
    return changed
