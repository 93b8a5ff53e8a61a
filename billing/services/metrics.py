"""The business state the metrics exporter reads from the database (the truth, not task counts).

Each figure is one query. The live ones (`read_live`, every scrape) are index lookups: the review queue, the
due lag, the refund deadline, the pause and the leases read the partial indexes (or primary keys) that the
workers' own scans use, so they cost the same at any table size. The history ones (`read_history`: invoices and
refunds by state, finished attempts, recovered invoices, MRR) aggregate whole tables, and no existing index
makes a count of millions of rows cheap: billing.metrics reads them in the background every so often
(PERFORMANCE.md, "Metrics scrape", has the figures and what would make them cheap).

Label values come from closed sets (states, decline classes, the error codes `billing.domain.declines` knows,
pause reasons, task names): an id, a token or a code nobody listed never becomes a label.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, func, select

from billing import task_names
from billing.db.control import PAUSE_KEY
from billing.db.models import ChargeAttempt, Control, Invoice, Plan, Refund, Subscription
from billing.domain import declines
from billing.domain.periods import monthly_share
from billing.domain.states import AttemptState, InvoiceState, RefundState, SubscriptionStatus
from billing.services.pause import PauseReason

# Attempts are counted once finished: approved, declined and duplicate never change again, and a not_sent one
# changes only when Tpaga's late answer arrives (rare). Pending, sending and unknown ones are in flight or in
# the review queue (billing_review_queue_items), so the counter never counts an attempt twice.
FINISHED_ATTEMPTS = (AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.DUPLICATE, AttemptState.NOT_SENT)
# Subscriptions that bring revenue in: trials have not paid yet, unpaid and canceled ones never will.
REVENUE_STATUSES = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)
# Refunds that still have to reach Tpaga before their deadline.
PENDING_REFUNDS = (RefundState.REQUESTED, RefundState.SENDING, RefundState.UNKNOWN)
KNOWN_CODES = (
    declines.APPROVED_CODES
    | declines.HARD_CODES
    | declines.SOFT_CODES
    | declines.MERCHANT_CODES
    | declines.UNKNOWN_CODES
) - {""}
NONE = "none"  # the label value of a missing error code or decline class
OTHER = "other"  # an error code or pause reason outside the known sets

_inv: Any = Invoice.__table__
_att: Any = ChargeAttempt.__table__
_sub: Any = Subscription.__table__
_ref: Any = Refund.__table__
_plan: Any = Plan.__table__
_ctl: Any = Control.__table__


@dataclass(frozen=True)
class Live:
    """The figures read on every scrape (index lookups); ages and durations in seconds from `now`."""

    now: datetime  # the billing clock when read
    review_items: int
    review_oldest_age_seconds: float  # 0 when the queue is empty
    due_lag_seconds: float  # 0 when nothing is overdue
    paused_reason: str | None  # a PauseReason value or OTHER; None while billing runs
    refund_nearest_deadline_seconds: float | None  # None when no refund is pending; negative when one is late
    periodic_last_run: dict[str, datetime]  # periodic task name -> when its last run took the lease


@dataclass(frozen=True)
class History:
    """The figures that aggregate whole tables: read in the background, every so often (billing.metrics)."""

    now: datetime
    invoices: dict[str, int]  # every invoice state, 0 included
    attempts: dict[tuple[str, str, str], int]  # (state, error code label, decline class label) -> finished attempts
    refunds: dict[str, int]  # every refund state, 0 included
    recovered_invoices: int
    mrr_minor: dict[str, int]  # currency -> monthly recurring revenue in minor units


def code_label(code: str | None) -> str:
    """The error_code label of a stored errorCode: the code itself when it is one Tpaga documents."""
    if code is None or code == "":
        return NONE
    normalized = declines.normalize_code(code)
    return normalized if normalized in KNOWN_CODES else OTHER


def _age_seconds(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


# --- the queries, one per figure (the benchmark times each) -----------------------------------------------


def invoices_by_state(conn: Connection, now: datetime) -> dict[str, int]:
    counts = {state.value: 0 for state in InvoiceState}
    for state, count in conn.execute(select(_inv.c.state, func.count()).group_by(_inv.c.state)):
        counts[str(state)] = int(count)
    return counts


def finished_attempts(conn: Connection, now: datetime) -> dict[tuple[str, str, str], int]:
    query = (
        select(_att.c.state, _att.c.error_code, _att.c.decline_class, func.count())
        .where(_att.c.state.in_([s.value for s in FINISHED_ATTEMPTS]))
        .group_by(_att.c.state, _att.c.error_code, _att.c.decline_class)
    )
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for state, code, klass, count in conn.execute(query):
        counts[(str(state), code_label(code), str(klass) if klass else NONE)] += int(count)
    return dict(counts)


def review_queue(conn: Connection, now: datetime) -> tuple[int, float]:
    """How many invoices are in review and how long the oldest has waited (ix_invoices_review)."""
    query = select(func.count(), func.min(Invoice.updated_at)).where(_inv.c.state == InvoiceState.REVIEW.value)
    count, oldest = conn.execute(query).one()
    return int(count), _age_seconds(now, oldest)


def due_lag(conn: Connection, now: datetime) -> float:
    """How late the oldest owed piece of work is: a subscription period due without its invoice (beat opens
    it), an open invoice past its due time (the charge or the sweep sends it), or a charge in flight past its
    lease (reconciliation settles it). Each is the first entry of the partial index its own scan uses
    (ix_subscriptions_due, ix_invoices_due, ix_charge_attempts_inflight)."""
    query = select(
        _oldest(Subscription.next_billing_at, _sub.c.next_billing_at.is_not(None)),
        _oldest(Invoice.due_at, _inv.c.state == InvoiceState.OPEN.value, _inv.c.due_at.is_not(None)),
        _oldest(
            ChargeAttempt.lease_expires_at,
            _att.c.state.in_([AttemptState.PENDING.value, AttemptState.SENDING.value]),
            _att.c.lease_expires_at.is_not(None),
        ),
    )
    return max(_age_seconds(now, oldest) for oldest in conn.execute(query).one())


def _oldest(column: Any, *where: Any) -> Any:
    """min(column) over the rows of `where`, as a scalar subquery: one round trip for the three of due_lag."""
    return select(func.min(column)).where(*where).scalar_subquery()


def paused_reason(conn: Connection, now: datetime) -> str | None:
    raw = conn.execute(select(_ctl.c.value).where(_ctl.c.key == PAUSE_KEY)).scalar_one_or_none()
    if not raw:
        return None
    try:
        reason = json.loads(raw).get("reason")
    except (ValueError, AttributeError):
        return OTHER
    return reason if reason in {r.value for r in PauseReason} else OTHER


def refunds_by_state(conn: Connection, now: datetime) -> dict[str, int]:
    counts = {state.value: 0 for state in RefundState}
    for state, count in conn.execute(select(_ref.c.state, func.count()).group_by(_ref.c.state)):
        counts[str(state)] = int(count)
    return counts


def refund_nearest_deadline(conn: Connection, now: datetime) -> float | None:
    """Seconds left before the nearest deadline of a refund still to reach Tpaga (ix_refunds_due covers
    requested and sending; unknown ones are few: each is one void in doubt)."""
    nearest = conn.execute(
        select(func.min(Refund.deadline_at)).where(_ref.c.state.in_([s.value for s in PENDING_REFUNDS]))
    ).scalar_one()
    return (nearest - now).total_seconds() if nearest is not None else None


def periodic_last_run(conn: Connection, now: datetime) -> dict[str, datetime]:
    """When each periodic task's last run took its lease (tasks.leases writes `lease:<name>`)."""
    keys = {"lease:" + name: name for name in task_names.PERIODIC_TASKS}
    rows = conn.execute(select(_ctl.c.key, Control.updated_at).where(_ctl.c.key.in_(list(keys))))
    return {keys[key]: at for key, at in rows}


def recovered_invoices(conn: Connection, now: datetime) -> int:
    """Invoices paid after at least one decline (dunning sets last_error_code on every decline)."""
    query = select(func.count()).where(_inv.c.state == InvoiceState.PAID.value, _inv.c.last_error_code.is_not(None))
    return int(conn.execute(query).scalar_one())


def mrr(conn: Connection, now: datetime) -> dict[str, int]:
    """Monthly recurring revenue by currency: each paying, unpaused subscription's plan amount per month."""
    per_plan = (
        select(_sub.c.plan_id, func.count().label("n"))
        .where(_sub.c.status.in_([s.value for s in REVENUE_STATUSES]), _sub.c.paused_at.is_(None))
        .group_by(_sub.c.plan_id)
        .subquery()
    )
    query = select(_plan.c.currency, _plan.c.amount_minor, _plan.c.interval, _plan.c.interval_count, per_plan.c.n).join(
        per_plan, per_plan.c.plan_id == _plan.c.id
    )
    totals: dict[str, Fraction] = defaultdict(Fraction)
    for currency, amount_minor, interval, interval_count, count in conn.execute(query):
        totals[str(currency)] += amount_minor * count * monthly_share(interval, interval_count)
    return {currency: round(total) for currency, total in totals.items()}


# The event stream (webhook endpoints and their backlog) lands separately: its query goes here, and
# billing.metrics exposes it as billing_webhook_backlog{endpoint} (see WEBHOOK_BACKLOG there).

LIVE_QUERIES: dict[str, Callable[[Connection, datetime], Any]] = {
    "review_queue": review_queue,
    "due_lag": due_lag,
    "paused_reason": paused_reason,
    "refund_nearest_deadline": refund_nearest_deadline,
    "periodic_last_run": periodic_last_run,
}
HISTORY_QUERIES: dict[str, Callable[[Connection, datetime], Any]] = {
    "invoices_by_state": invoices_by_state,
    "finished_attempts": finished_attempts,
    "refunds_by_state": refunds_by_state,
    "recovered_invoices": recovered_invoices,
    "mrr": mrr,
}


def read_live(conn: Connection, now: datetime) -> Live:
    review_items, review_age = review_queue(conn, now)
    return Live(
        now=now,
        review_items=review_items,
        review_oldest_age_seconds=review_age,
        due_lag_seconds=due_lag(conn, now),
        paused_reason=paused_reason(conn, now),
        refund_nearest_deadline_seconds=refund_nearest_deadline(conn, now),
        periodic_last_run=periodic_last_run(conn, now),
    )


def read_history(conn: Connection, now: datetime) -> History:
    return History(
        now=now,
        invoices=invoices_by_state(conn, now),
        attempts=finished_attempts(conn, now),
        refunds=refunds_by_state(conn, now),
        recovered_invoices=recovered_invoices(conn, now),
        mrr_minor=mrr(conn, now),
    )
