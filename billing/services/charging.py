"""Charging an invoice: commit the attempt, call Tpaga between two transactions, record the outcome.

Every state change is a compare-and-set on the row's current state, and the partial unique indexes on
charge_attempts make "two approved attempts" and "two attempts in flight" impossible in the database.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from billing.db import control
from billing.db.models import Card, ChargeAttempt, Invoice, Plan, Subscription
from billing.domain.declines import DeclineClass
from billing.domain.dunning import Action, decide_after_decline
from billing.domain.money import Money
from billing.domain.states import AttemptState, CardStatus, InvoiceState, SubscriptionStatus
from billing.gateway import errors as gw
from billing.services import events
from billing.services.context import Context

log = logging.getLogger("billing.charging")


@dataclass(frozen=True)
class ChargeOutcome:
    """What one `charge_invoice` call did; small and free of secrets, fit for a task result."""

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


def billing_paused(session: Session) -> dict[str, Any] | None:
    return control.get_pause(session)


def pause_billing(session: Session, now: datetime, reason: str, error_code: str | None) -> None:
    """Stop all charging until an operator (or the gateway probe) resumes it."""
    if control.get_pause(session) is None:
        payload = json.dumps({"reason": reason, "error_code": error_code, "since": now.isoformat()})
        control.set_value(session, control.PAUSE_KEY, payload, now)
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


def _usable_card(session: Session, sub: Subscription) -> Card | None:
    if sub.card_id is not None:
        card = session.get(Card, sub.card_id)
        if card is not None and card.status == CardStatus.USABLE:
            return card
    return session.execute(
        select(Card)
        .where(Card.customer_id == sub.customer_id, Card.status == CardStatus.USABLE)
        .order_by(Card.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _cas(session: Session, model: Any, row_id: int, states: tuple[str, ...], **values: Any) -> bool:
    """UPDATE ... WHERE id = :id AND state IN (:states); True when this caller made the change."""
    result = session.execute(
        update(model)
        .where(model.id == row_id, model.state.in_(states))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Claim:
    attempt_id: int
    order_id: str
    card_tpaga_id: str
    amount: Money
    description: str


def charge_invoice(ctx: Context, invoice_id: int) -> ChargeOutcome:
    """Charge one open invoice if it is due now; idempotent under duplicate delivery and concurrency."""
    claim_or_outcome = _claim(ctx, invoice_id)
    if isinstance(claim_or_outcome, ChargeOutcome):
        return claim_or_outcome
    claim = claim_or_outcome
    # Second commit: the attempt is marked in flight with a lease before the request leaves.
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        if not _cas(
            session,
            ChargeAttempt,
            claim.attempt_id,
            (AttemptState.PENDING,),
            state=AttemptState.SENDING,
            sent_at=now,
            lease_expires_at=now + ctx.sending_lease,
        ):
            return ChargeOutcome(invoice_id, "lost_claim", claim.attempt_id)
    try:
        charge = ctx.gateway.charge(
            card_id=claim.card_tpaga_id,
            amount=claim.amount.major,
            currency=claim.amount.currency,
            order_id=claim.order_id,
            description=claim.description,
        )
    except gw.DeclinedError as exc:
        return _with_db_retry(_record_decline, ctx, invoice_id, claim.attempt_id, exc)
    except gw.NotSentError as exc:
        return _with_db_retry(_record_not_sent, ctx, invoice_id, claim.attempt_id, exc, None)
    except gw.UnauthorizedError as exc:
        return _with_db_retry(_record_not_sent, ctx, invoice_id, claim.attempt_id, exc, "unauthorized")
    except (gw.ValidationError, gw.NotFoundError) as exc:
        # Tpaga refused the request itself (no charge made): an operator must look at the stored card.
        return _with_db_retry(_record_rejected, ctx, invoice_id, claim.attempt_id, exc)
    except Exception as exc:  # OutcomeUnknownError and anything unexpected: may have charged
        return _with_db_retry(_record_unknown, ctx, invoice_id, claim.attempt_id, exc)
    return _with_db_retry(_record_approved, ctx, invoice_id, claim.attempt_id, charge)


def _claim(ctx: Context, invoice_id: int) -> _Claim | ChargeOutcome:
    """First commit: take the invoice off the schedule and write the attempt with its orderId."""
    now = ctx.clock.now()
    try:
        with ctx.unit_of_work() as session:
            if billing_paused(session) is not None:
                return ChargeOutcome(invoice_id, "paused")
            invoice = session.get(Invoice, invoice_id)
            if invoice is None:
                from billing.services.errors import NotFound

                raise NotFound(f"invoice {invoice_id} does not exist")
            if invoice.state != InvoiceState.OPEN:
                return ChargeOutcome(
                    invoice_id,
                    {"paid": "already_paid", "review": "in_review"}.get(invoice.state, invoice.state),
                )
            if invoice.due_at is None:
                return ChargeOutcome(invoice_id, "not_scheduled")
            if invoice.due_at > now:
                return ChargeOutcome(invoice_id, "not_due")
            sub = session.get(Subscription, invoice.subscription_id)
            assert sub is not None
            if sub.status == SubscriptionStatus.CANCELED:
                _cas(
                    session,
                    Invoice,
                    invoice_id,
                    (InvoiceState.OPEN,),
                    state=InvoiceState.VOID,
                    due_at=None,
                    updated_at=now,
                )
                return ChargeOutcome(invoice_id, "void")
            card = _usable_card(session, sub)
            if card is None:
                session.execute(
                    update(Invoice)
                    .where(Invoice.id == invoice_id, Invoice.state == InvoiceState.OPEN)
                    .values(due_at=None, updated_at=now)
                )
                session.execute(
                    update(Subscription)
                    .where(Subscription.id == sub.id, Subscription.status != SubscriptionStatus.CANCELED)
                    .values(status=SubscriptionStatus.PAST_DUE, updated_at=now)
                )
                events.record(session, now, "invoice.awaiting_card", subscription_id=sub.id, invoice_id=invoice_id)
                return ChargeOutcome(invoice_id, "no_usable_card")
            # Compare-and-set on the exact schedule we read: a concurrent claimer sees rowcount 0.
            claimed = session.execute(
                update(Invoice)
                .where(
                    Invoice.id == invoice_id,
                    Invoice.state == InvoiceState.OPEN,
                    Invoice.due_at == invoice.due_at,
                )
                .values(due_at=None, updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                return ChargeOutcome(invoice_id, "claimed_elsewhere")
            number = (
                session.execute(
                    select(func.coalesce(func.max(ChargeAttempt.attempt_number), 0)).where(
                        ChargeAttempt.invoice_id == invoice_id
                    )
                ).scalar_one()
                + 1
            )
            plan = session.get(Plan, sub.plan_id)
            assert plan is not None
            attempt = ChargeAttempt(
                invoice_id=invoice_id,
                attempt_number=number,
                order_id=f"inv{invoice_id}-a{number}",
                card_id=card.id,
                amount_minor=invoice.amount_minor,
                currency=invoice.currency,
                state=AttemptState.PENDING,
                lease_expires_at=now + ctx.sending_lease,
                created_at=now,
            )
            session.add(attempt)
            session.flush()
            return _Claim(
                attempt_id=attempt.id,
                order_id=attempt.order_id,
                card_tpaga_id=card.tpaga_card_id,
                amount=Money(invoice.amount_minor, invoice.currency),
                description=f"{plan.name} period {invoice.period_index + 1}",
            )
    except IntegrityError:
        # The partial unique index refused a second attempt in flight for this invoice.
        return ChargeOutcome(invoice_id, "claimed_elsewhere")


def _with_db_retry(record: Any, *args: Any, attempts: int = 5) -> ChargeOutcome:
    """Recording an outcome must survive a database blip: the gateway call cannot be taken back."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            result: ChargeOutcome = record(*args)
            return result
        except OperationalError:
            if attempt == attempts:
                raise  # the lease expires and reconciliation flags the attempt as unknown
            log.warning("recording a charge outcome failed (attempt %d); retrying", attempt)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


IN_FLIGHT = (AttemptState.SENDING, AttemptState.UNKNOWN)


def _record_approved(ctx: Context, invoice_id: int, attempt_id: int, charge: Any) -> ChargeOutcome:
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        # IN_FLIGHT: a late answer still wins over a lease that reconciliation already expired.
        _cas(
            session,
            ChargeAttempt,
            attempt_id,
            IN_FLIGHT,
            state=AttemptState.APPROVED,
            tpaga_charge_id=charge.id,
            error_code=charge.error_code,
            error_message=(charge.error_message or "")[:255],
            decline_class=DeclineClass.APPROVED,
            authorization_code=charge.authorization_code,
            http_status=201,
            finished_at=now,
            approved_at=now,
            lease_expires_at=None,
        )
        mark_invoice_paid(session, now, invoice_id, attempt_id)
    return ChargeOutcome(invoice_id, "approved", attempt_id, "00")


def mark_invoice_paid(session: Session, now: datetime, invoice_id: int, attempt_id: int) -> None:
    _cas(
        session,
        Invoice,
        invoice_id,
        (InvoiceState.OPEN, InvoiceState.REVIEW),
        state=InvoiceState.PAID,
        paid_at=now,
        due_at=None,
        review_reason=None,
        updated_at=now,
    )
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    events.record(
        session,
        now,
        "charge.approved",
        subscription_id=invoice.subscription_id,
        invoice_id=invoice_id,
        attempt_id=attempt_id,
    )
    outstanding = session.execute(
        select(func.count(Invoice.id)).where(
            Invoice.subscription_id == invoice.subscription_id,
            Invoice.state.in_((InvoiceState.OPEN, InvoiceState.REVIEW)),
            Invoice.id != invoice_id,
        )
    ).scalar_one()
    if not outstanding:
        session.execute(
            update(Subscription)
            .where(
                Subscription.id == invoice.subscription_id,
                Subscription.status.in_((SubscriptionStatus.PAST_DUE, SubscriptionStatus.TRIALING)),
            )
            .values(status=SubscriptionStatus.ACTIVE, updated_at=now)
        )


def _record_decline(ctx: Context, invoice_id: int, attempt_id: int, exc: Any) -> ChargeOutcome:
    now = ctx.clock.now()
    charge = exc.charge
    code = exc.error_code
    klass = DeclineClass(exc.decline_class)
    with ctx.unit_of_work() as session:
        _cas(
            session,
            ChargeAttempt,
            attempt_id,
            IN_FLIGHT,
            state=AttemptState.DECLINED,
            tpaga_charge_id=getattr(charge, "id", None),
            error_code=code,
            error_message=(getattr(charge, "error_message", None) or "")[:255],
            decline_class=klass,
            http_status=exc.http_status,
            finished_at=now,
            lease_expires_at=None,
        )
        apply_decline(ctx, session, now, invoice_id, attempt_id, code, klass)
    return ChargeOutcome(invoice_id, "declined", attempt_id, code)


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
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    sub = session.get(Subscription, invoice.subscription_id)
    assert sub is not None
    attempt = session.get(ChargeAttempt, attempt_id)
    assert attempt is not None
    soft = invoice.soft_failures + (1 if klass == DeclineClass.SOFT else 0)
    first_failure = invoice.first_failure_at or now
    decision = decide_after_decline(ctx.policy, klass, first_failure_at=first_failure, soft_failures=soft, now=now)
    inv_values: dict[str, Any] = {"last_error_code": code, "updated_at": now}
    if decision.counts_as_attempt:
        inv_values.update(soft_failures=soft, first_failure_at=first_failure)
    if decision.action == Action.RETRY:
        inv_values["due_at"] = decision.retry_at
    elif decision.action == Action.UNCOLLECTIBLE:
        inv_values.update(state=InvoiceState.UNCOLLECTIBLE, due_at=None)
    elif decision.action == Action.AWAIT_NEW_CARD:
        inv_values["due_at"] = None
    elif decision.action == Action.PAUSE_MERCHANT:
        inv_values["due_at"] = now  # charged again as soon as billing resumes
        pause_billing(session, now, "merchant_decline", code)
    elif decision.action == Action.REVIEW:
        inv_values.update(state=InvoiceState.REVIEW, due_at=None, review_reason=f"errorCode {code!r}")
    _cas(session, Invoice, invoice_id, (InvoiceState.OPEN, InvoiceState.REVIEW), **inv_values)
    if decision.card_unusable:
        session.execute(
            update(Card).where(Card.id == attempt.card_id).values(status=CardStatus.UNUSABLE, unusable_code=code)
        )
    if decision.subscription_status is not None:
        sub_values: dict[str, Any] = {"status": decision.subscription_status, "updated_at": now}
        if decision.subscription_status in (SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED):
            sub_values["next_billing_at"] = None
            if decision.subscription_status == SubscriptionStatus.CANCELED:
                sub_values["canceled_at"] = now
        session.execute(
            update(Subscription)
            .where(Subscription.id == sub.id, Subscription.status != SubscriptionStatus.CANCELED)
            .values(**sub_values)
        )
    events.record(
        session,
        now,
        "charge.declined",
        subscription_id=sub.id,
        invoice_id=invoice_id,
        attempt_id=attempt_id,
        error_code=code,
        decline_class=str(klass),
        action=str(decision.action),
    )


def _record_not_sent(
    ctx: Context, invoice_id: int, attempt_id: int, exc: Exception, pause: str | None
) -> ChargeOutcome:
    """The request never reached Tpaga (or Tpaga refused our credentials): no charge, no attempt spent."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        _cas(
            session,
            ChargeAttempt,
            attempt_id,
            IN_FLIGHT,
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


def _record_rejected(ctx: Context, invoice_id: int, attempt_id: int, exc: Exception) -> ChargeOutcome:
    now = ctx.clock.now()
    reason = f"gateway rejected the charge request ({type(exc).__name__})"
    with ctx.unit_of_work() as session:
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


def _record_unknown(ctx: Context, invoice_id: int, attempt_id: int, exc: Exception) -> ChargeOutcome:
    now = ctx.clock.now()
    reason = getattr(exc, "reason", None) or type(exc).__name__
    with ctx.unit_of_work() as session:
        mark_unknown(
            session,
            now,
            invoice_id,
            attempt_id,
            str(reason),
            getattr(exc, "charge_id", None),
            getattr(exc, "http_status", None),
            getattr(exc, "error_code", None),
        )
    return ChargeOutcome(invoice_id, "unknown", attempt_id)


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
