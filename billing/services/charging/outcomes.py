"""Phase 4 of a charge, and every later settlement of an attempt. With `answers` (what Tpaga said), this is
the only place that writes an attempt's final state: the pipeline, reconciliation's lookups and the
operator's review all come here.

Each write is a checked transition (billing.db.cas): the effects on other rows (invoice paid, dunning, the
events) follow only the attempts that moved, so a redelivered or re-run record (a lost COMMIT acknowledgement)
changes nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.db import bulk, cas
from billing.db.models import ChargeAttempt, Invoice
from billing.domain.declines import DeclineClass
from billing.domain.states import AttemptState, InvoiceState
from billing.gateway import errors as gw
from billing.gateway.models import Charge
from billing.services import events, refunds, stream
from billing.services.charging.answers import LOCKED_INVOICE_COLUMNS, Answer, record_approvals, record_declines
from billing.services.charging.attempts import CallResult, ChargeOutcome, Claim, HeldBack, Outcome
from billing.services.context import Context
from billing.services.pause import PauseReason, note_not_sent, note_reached, pause_billing

log = logging.getLogger("billing.charging")

T = TypeVar("T")


def record_outcomes(ctx: Context, sent: Sequence[CallResult]) -> list[ChargeOutcome]:
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
        log.error("recording %d outcomes in one transaction failed (%s); one by one", len(sent), type(exc).__name__)
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
            outcomes.append(ChargeOutcome(item.claim.invoice_id, Outcome.UNRECORDED, item.claim.attempt_id))
    return outcomes


def _record_all(ctx: Context, sent: Sequence[CallResult]) -> list[ChargeOutcome]:
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        return record_in(ctx, session, now, sent)


def _with_db_retry(record: Callable[..., T], *args: Any, attempts: int = 5) -> T:
    """Recording an outcome must survive a database blip: the gateway call cannot be taken back. A re-run after
    a commit whose acknowledgement was lost finds its transitions made and applies nothing twice."""
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


def record_in(ctx: Context, session: Session, now: datetime, sent: Sequence[CallResult]) -> list[ChargeOutcome]:
    """Apply the outcomes of the given calls in the caller's transaction; returns them in the same order."""
    # Invoices before attempts, in id order, in every transaction that writes both: no deadlock with
    # mark_sending, cancel_subscription or reconciliation.
    invoices = bulk.lock_rows(session, Invoice, [item.claim.invoice_id for item in sent], *LOCKED_INVOICE_COLUMNS)
    approved: list[Answer] = []
    declined: list[Answer] = []
    outcomes: dict[int, ChargeOutcome] = {}
    for item in sent:
        claim, exc = item.claim, item.error
        if exc is None and item.charge is not None:
            approved.append(Answer.of_charge(claim.invoice_id, claim.attempt_id, item.charge, http_status=201))
            approved[-1] = _answered_now(approved[-1], now)
        elif isinstance(exc, gw.DeclinedError):
            declined.append(_decline_answer(claim, exc))
    # Declines first: a merchant-class decline records its pause (with its errorCode) before the calls the
    # batch held back because of it record theirs.
    decided = record_declines(ctx, session, now, declined)
    decided.update(record_approvals(ctx, session, now, approved, invoices))
    for answer in [*declined, *approved]:
        kind = Outcome.DECLINED if answer.decline_class != DeclineClass.APPROVED else Outcome.APPROVED
        outcomes[answer.attempt_id] = ChargeOutcome(
            answer.invoice_id, decided.get(answer.attempt_id, kind), answer.attempt_id, answer.error_code
        )
    not_sent = False
    for item in sent:
        claim, exc = item.claim, item.error
        if claim.attempt_id in outcomes:
            continue
        if isinstance(exc, HeldBack):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, exc.pause)
        elif isinstance(exc, gw.NotSentError):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, None)
            not_sent = True
        elif isinstance(exc, gw.UnauthorizedError):
            outcomes[claim.attempt_id] = _record_not_sent(ctx, session, now, claim, exc, PauseReason.UNAUTHORIZED)
        elif isinstance(exc, gw.ValidationError | gw.NotFoundError):
            # Tpaga refused the request itself (no charge made): an operator must look at the stored card.
            outcomes[claim.attempt_id] = _record_rejected(session, now, claim, exc)
        else:  # OutcomeUnknownError and anything unexpected: may have charged
            outcomes[claim.attempt_id] = _record_unknown(session, now, claim, exc or ValueError("no answer"))
    if approved or declined:
        note_reached(ctx, session)
    elif not_sent:
        note_not_sent(session, now, ctx.unreachable_pause_after)
    return [outcomes[item.claim.attempt_id] for item in sent]


def _answered_now(answer: Answer, now: datetime) -> Answer:
    """The call's own answer: approved now (Tpaga's clock may differ from ours; the safety margin covers the
    latency between its approval and our recording)."""
    return replace(answer, approved_at=now)


def _decline_answer(claim: Claim, exc: gw.DeclinedError) -> Answer:
    charge = exc.charge
    return Answer(
        claim.invoice_id,
        claim.attempt_id,
        getattr(charge, "id", None),
        exc.error_code,
        DeclineClass(exc.decline_class),
        getattr(charge, "error_message", None),
        None,
        exc.http_status,
    )


def _record_not_sent(
    ctx: Context, session: Session, now: datetime, claim: Claim, exc: Exception, pause: PauseReason | None
) -> ChargeOutcome:
    """The request never reached Tpaga (or Tpaga refused our credentials): no charge, no attempt spent. The
    attempt may still be `pending` when the batch held the call back before marking it sending."""
    invoice_id, attempt_id = claim.invoice_id, claim.attempt_id
    moved = cas.transition(
        session,
        ChargeAttempt,
        attempt_id,
        AttemptState.NOT_SENT,
        now=now,
        http_status=getattr(exc, "http_status", None),
        error_message=type(exc).__name__,
        finished_at=now,
        lease_expires_at=None,
    )
    if pause:
        pause_billing(session, now, pause, None)
    if moved:
        retry_at = now if pause else now + ctx.not_sent_backoff
        cas.update_while(session, Invoice, invoice_id, InvoiceState.OPEN, due_at=retry_at, updated_at=now)
        events.record(
            session, now, "charge.not_sent", invoice_id=invoice_id, attempt_id=attempt_id, error=type(exc).__name__
        )
    return ChargeOutcome(invoice_id, Outcome.PAUSED if pause else Outcome.NOT_SENT, attempt_id)


def _record_rejected(session: Session, now: datetime, claim: Claim, exc: Exception) -> ChargeOutcome:
    invoice_id, attempt_id = claim.invoice_id, claim.attempt_id
    reason = f"gateway rejected the charge request ({type(exc).__name__})"
    if cas.transition(
        session,
        ChargeAttempt,
        attempt_id,
        AttemptState.NOT_SENT,
        now=now,
        http_status=getattr(exc, "http_status", None),
        error_message=reason[:255],
        finished_at=now,
        lease_expires_at=None,
    ):
        in_review = cas.transition(
            session,
            Invoice,
            invoice_id,
            InvoiceState.REVIEW,
            now=now,
            due_at=None,
            review_reason=reason[:255],
            updated_at=now,
        )
        events.record(
            session, now, "attempt.rejected", invoice_id=invoice_id, attempt_id=attempt_id, error=type(exc).__name__
        )
        if in_review:
            emit_in_review(session, now, invoice_id, attempt_id, reason)
    return ChargeOutcome(invoice_id, Outcome.REJECTED, attempt_id)


def emit_in_review(session: Session, now: datetime, invoice_id: int, attempt_id: int, reason: str) -> None:
    """invoice.in_review: no charge until an operator or a lookup settles the attempt (a rare path: one read)."""
    invoice = session.execute(
        select(Invoice.subscription_id, Invoice.amount_minor, Invoice.currency, ChargeAttempt.attempt_number)
        .join(ChargeAttempt, ChargeAttempt.invoice_id == Invoice.id)
        .where(Invoice.id == invoice_id, ChargeAttempt.id == attempt_id)
    ).one()
    stream.emit(
        session,
        now,
        "invoice.in_review",
        subscription_id=invoice.subscription_id,
        invoice_id=invoice_id,
        charge_id=attempt_id,
        attempt=invoice.attempt_number,
        **stream.money(invoice.amount_minor, invoice.currency),
        reason=reason[:255],
    )


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
    return ChargeOutcome(claim.invoice_id, Outcome.UNKNOWN, claim.attempt_id)


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
    changed = cas.transition(
        session,
        ChargeAttempt,
        attempt_id,
        AttemptState.UNKNOWN,
        now=now,
        unknown_reason=reason[:64],
        error_code=error_code,
        tpaga_charge_id=charge_id,
        http_status=http_status,
        finished_at=now,
        lease_expires_at=None,
    )
    if changed:
        if cas.transition(
            session,
            Invoice,
            invoice_id,
            InvoiceState.REVIEW,
            now=now,
            due_at=None,
            review_reason=f"charge outcome unknown: {reason}"[:255],
            updated_at=now,
        ):
            emit_in_review(session, now, invoice_id, attempt_id, f"charge outcome unknown: {reason}")
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


def abandon_unsent(session: Session, now: datetime, invoice_id: int, attempt_id: int) -> bool:
    """A `pending` attempt whose worker died before sending: not sent, and its invoice is due again."""
    if not cas.transition(
        session,
        ChargeAttempt,
        attempt_id,
        AttemptState.NOT_SENT,
        now=now,
        error_message="worker lost before sending",
        finished_at=now,
        lease_expires_at=None,
    ):
        return False
    cas.update_while(session, Invoice, invoice_id, InvoiceState.OPEN, due_at=now, updated_at=now)
    events.record(session, now, "attempt.abandoned", invoice_id=invoice_id, attempt_id=attempt_id)
    return True


def settle_from_charge(
    ctx: Context,
    invoice_id: int,
    attempt_id: int,
    charge: Charge,
    *,
    by: str,
    note: Callable[[Session, datetime, str], None] | None = None,
) -> str:
    """Apply what Tpaga says about a charge (a lookup's or an operator's) to an unknown attempt: `approved`,
    `voided` (approved, then voided at Tpaga: recorded with its refund), `declined` or `still_unknown`.

    `note` sees the session, the time and the outcome of a settlement that happened, before it commits (an
    operator's audit event)."""
    now = ctx.clock.now()
    answer = Answer.of_charge(invoice_id, attempt_id, charge, http_status=None)
    voided = charge.voided or (not charge.paid and charge.error_code == "00")
    if voided:
        answer = replace(answer, decline_class=DeclineClass.APPROVED)
    elif answer.decline_class == DeclineClass.UNKNOWN:
        return "still_unknown"
    with ctx.unit_of_work() as session:
        invoices = bulk.lock_rows(session, Invoice, [invoice_id], *LOCKED_INVOICE_COLUMNS)  # (see record_in)
        current = session.execute(
            select(ChargeAttempt.state).where(ChargeAttempt.id == attempt_id)
        ).scalar_one_or_none()
        if current != AttemptState.UNKNOWN:
            return "still_unknown"
        if answer.decline_class == DeclineClass.APPROVED:
            decided = record_approvals(ctx, session, now, [answer], invoices)
            if voided and attempt_id not in decided:
                refunds.record_voided_at_gateway(session, now, attempt_id, invoice_id)
            outcome = "voided" if voided else str(decided.get(attempt_id, Outcome.APPROVED))
        else:
            record_declines(ctx, session, now, [answer])
            outcome = "declined"
        events.record(
            session, now, "attempt.resolved", invoice_id=invoice_id, attempt_id=attempt_id, outcome=outcome, by=by
        )
        if note is not None:
            note(session, now, outcome)
        return outcome


def settle_late_approval(
    ctx: Context,
    invoice_id: int,
    attempt_id: int,
    charge: Charge,
    *,
    note: Callable[[Session, datetime, str], None] | None = None,
) -> str:
    """A paid charge found (in a transaction report) for an attempt settled as `not_sent`: recorded as the late
    answer it is. It pays the invoice if nothing else did (`approved`), else the attempt is a `duplicate` and
    its charge is voided inside the window, or `void` when the invoice was voided; `unchanged` when the
    attempt is no longer `not_sent` or the charge is not paid."""
    if not charge.paid:
        return "unchanged"
    now = ctx.clock.now()
    answer = Answer.of_charge(invoice_id, attempt_id, charge, http_status=None)
    with ctx.unit_of_work() as session:
        invoices = bulk.lock_rows(session, Invoice, [invoice_id], "state", "subscription_id")  # (see record_in)
        current = session.execute(
            select(ChargeAttempt.state).where(ChargeAttempt.id == attempt_id)
        ).scalar_one_or_none()
        if current != AttemptState.NOT_SENT:
            return "unchanged"
        decided = record_approvals(ctx, session, now, [answer], invoices)
        outcome = str(decided.get(attempt_id, Outcome.APPROVED))
        if note is not None:
            note(session, now, outcome)
        return outcome


def resolve_not_charged(session: Session, now: datetime, invoice_id: int, attempt_id: int | None) -> bool:
    """An operator found no charge at Tpaga: the attempt is not sent and dunning resumes where it was (the next
    try is now, and no customer attempt was spent). False when the invoice had left review meanwhile."""
    bulk.lock_rows(session, Invoice, [invoice_id], "state")  # invoices before attempts (see record_in)
    if attempt_id is not None and not cas.transition(
        session,
        ChargeAttempt,
        attempt_id,
        AttemptState.NOT_SENT,
        now=now,
        error_message="operator: not charged",
        finished_at=now,
    ):
        return False
    if not cas.transition(
        session, Invoice, invoice_id, InvoiceState.OPEN, now=now, due_at=now, review_reason=None, updated_at=now
    ):
        return False
    events.record(session, now, "review.resolved", invoice_id=invoice_id, attempt_id=attempt_id, charged=False)
    return True
