"""The business state the metrics exporter reads from the database (the truth, not task counts).

Nothing here scans a table. The live figures (`read_live`) read the partial indexes (or primary keys) that the
workers' own scans use. The counts (`read_history`: invoices, finished attempts and refunds by state, recovered
invoices, paying subscriptions per plan for MRR, each webhook endpoint's backlog) are maintained by the
database: triggers (migration 0009) append signed deltas to `metric_deltas` in the transaction that changes a
counted column, and a count is its `metric_totals` row plus the deltas not folded yet. `fold` moves the deltas
into the totals (the exporter before each read, and the reconcile task), so a read sums a few hundred rows at any
table size. PERFORMANCE.md, "Metrics scrape", has the figures.

Label values come from closed sets (states, decline classes, the error codes `billing.domain.declines` knows,
pause reasons, task names): an id, a token or a code nobody listed never becomes a label.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, func, select, text, union_all

from billing import task_names
from billing.db.control import PAUSE_KEY
from billing.db.models import (
    ChargeAttempt,
    Control,
    Endpoint,
    Invoice,
    MetricDelta,
    MetricTotal,
    Plan,
    Refund,
    Subscription,
)
from billing.domain import declines
from billing.domain.periods import monthly_share
from billing.domain.states import AttemptState, InvoiceState, RefundState, SubscriptionStatus
from billing.services.context import Context
from billing.services.pause import PauseReason

# What the triggers of migration 0009 count (a frozen copy there; tests/test_metric_counts.py checks both agree).
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
_end: Any = Endpoint.__table__
_tot: Any = MetricTotal.__table__
_dlt: Any = MetricDelta.__table__
# Deltas moved per fold: a fold after a long time without one (no exporter, no reconcile task) stays a bounded
# transaction, and the next one takes the rest.
FOLD_LIMIT = 100_000


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
    """The maintained counts (metric_totals + metric_deltas), read on every scrape like the live figures."""

    now: datetime
    invoices: dict[str, int]  # every invoice state, 0 included
    attempts: dict[tuple[str, str, str], int]  # (state, error code label, decline class label) -> finished attempts
    refunds: dict[str, int]  # every refund state, 0 included
    recovered_invoices: int
    mrr_minor: dict[str, int]  # currency -> monthly recurring revenue in minor units
    webhook_backlog: dict[str, int] = field(default_factory=dict)  # endpoint id -> deliveries not acknowledged
    webhook_failing: dict[str, bool] = field(default_factory=dict)  # endpoint id -> marked failing


def code_label(code: str | None) -> str:
    """The error_code label of a stored errorCode: the code itself when it is one Tpaga documents."""
    if code is None or code == "":
        return NONE
    normalized = declines.normalize_code(code)
    return normalized if normalized in KNOWN_CODES else OTHER


def _age_seconds(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


# --- the queries, one per figure (the benchmark times each) -----------------------------------------------


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


def refund_nearest_deadline(conn: Connection, now: datetime) -> float | None:
    """Seconds left before the nearest deadline of a refund still to reach Tpaga: the first entries of
    ix_refunds_due (requested, sending) and ix_refunds_unknown_deadline."""
    pending = [s for s in PENDING_REFUNDS if s is not RefundState.UNKNOWN]
    nearest = [
        at
        for at in conn.execute(
            select(
                _oldest(Refund.deadline_at, _ref.c.state.in_([s.value for s in pending])),
                _oldest(Refund.deadline_at, _ref.c.state == RefundState.UNKNOWN.value),
            )
        ).one()
        if at is not None
    ]
    return (min(nearest) - now).total_seconds() if nearest else None


def periodic_last_run(conn: Connection, now: datetime) -> dict[str, datetime]:
    """When each periodic task's last run took its lease (tasks.leases writes `lease:<name>`)."""
    keys = {"lease:" + name: name for name in task_names.PERIODIC_TASKS}
    rows = conn.execute(select(_ctl.c.key, Control.updated_at).where(_ctl.c.key.in_(list(keys))))
    return {keys[key]: at for key, at in rows}


# --- the maintained counts (metric_totals + metric_deltas, migration 0009) -----------------------------------

Key = tuple[str, str, str, str]  # (metric, k1, k2, k3) as the triggers write them


def maintained(conn: Connection, now: datetime) -> dict[Key, int]:
    """Every maintained count: its folded total plus the deltas appended since (one snapshot, no table scan)."""
    both = union_all(
        select(_tot.c.metric, _tot.c.k1, _tot.c.k2, _tot.c.k3, _tot.c.total.label("n")),
        select(_dlt.c.metric, _dlt.c.k1, _dlt.c.k2, _dlt.c.k3, _dlt.c.delta.label("n")),
    ).subquery()
    query = select(both.c.metric, both.c.k1, both.c.k2, both.c.k3, func.sum(both.c.n)).group_by(
        both.c.metric, both.c.k1, both.c.k2, both.c.k3
    )
    return {(str(m), str(k1), str(k2), str(k3)): int(n) for m, k1, k2, k3, n in conn.execute(query)}


def fold(conn: Connection) -> int:
    """Move the deltas into metric_totals, in the caller's transaction; returns how many were moved.

    On PostgreSQL one statement deletes the deltas it sees and adds exactly those to the totals: a delta
    committed meanwhile stays for the next fold, and two concurrent folds never move one delta twice (the second
    DELETE skips the rows the first removed). SQLite has one writer at a time, so the sum then the delete see the
    same rows."""
    if conn.dialect.name == "postgresql":
        moved = conn.execute(
            text(
                "WITH moved AS (DELETE FROM metric_deltas WHERE id IN "
                "  (SELECT id FROM metric_deltas ORDER BY id LIMIT :limit) RETURNING metric, k1, k2, k3, delta), "
                "sums AS (SELECT metric, k1, k2, k3, sum(delta) AS total, count(*) AS rows FROM moved "
                "  GROUP BY metric, k1, k2, k3), "
                "upserted AS (INSERT INTO metric_totals (metric, k1, k2, k3, total) "
                "  SELECT metric, k1, k2, k3, total FROM sums "
                "  ON CONFLICT (metric, k1, k2, k3) DO UPDATE SET total = metric_totals.total + excluded.total) "
                "SELECT coalesce(sum(rows), 0) FROM sums"
            ),
            {"limit": FOLD_LIMIT},
        ).scalar_one()
        return int(moved)
    # The INSERT comes first: it takes SQLite's write lock before anything is read.
    conn.execute(
        text(
            "INSERT INTO metric_totals (metric, k1, k2, k3, total) "
            "SELECT metric, k1, k2, k3, sum(delta) FROM metric_deltas WHERE 1 = 1 GROUP BY metric, k1, k2, k3 "
            "ON CONFLICT (metric, k1, k2, k3) DO UPDATE SET total = metric_totals.total + excluded.total"
        )
    )
    return int(conn.execute(text("DELETE FROM metric_deltas")).rowcount)


def rebuild_totals(conn: Connection) -> None:
    """metric_totals again from the rows, in the caller's transaction (after a TRUNCATE of a counted table, which
    fires no row trigger): the backfill of migration 0009, one scan of each counted table. On PostgreSQL the
    counted tables are locked against writers meanwhile."""
    migration: Any = importlib.import_module("billing.db.migrations.versions.0009_metric_counts")
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE " + ", ".join(migration.COUNTED) + " IN SHARE ROW EXCLUSIVE MODE"))
    conn.execute(text("DELETE FROM metric_deltas"))
    conn.execute(text("DELETE FROM metric_totals"))
    migration.backfill(conn)


def fold_deltas(ctx: Context) -> int:
    """`fold` in a transaction of its own (the reconcile task runs it, so deltas do not pile up without an
    exporter)."""
    with ctx.unit_of_work() as session:
        return fold(session.connection())


def _states(counts: dict[Key, int], metric: str, states: Iterable[str]) -> dict[str, int]:
    found = {state: 0 for state in states}
    for (m, k1, _, _), n in counts.items():
        if m == metric:
            found[k1] = found.get(k1, 0) + n
    return found


def _attempts(counts: dict[Key, int]) -> dict[tuple[str, str, str], int]:
    found: dict[tuple[str, str, str], int] = defaultdict(int)
    for (m, state, code, klass), n in counts.items():
        if m == "attempts":
            found[(state, code_label(code), klass or NONE)] += n
    # A label set that went back to 0 (a not_sent attempt answered late) is left out, as a GROUP BY would.
    return {key: n for key, n in found.items() if n}


def mrr(conn: Connection, paying: dict[str, int]) -> dict[str, int]:
    """Monthly recurring revenue by currency from the paying subscriptions per plan (plans are few: one lookup
    by primary key each), each plan's amount per month."""
    ids = [int(plan_id) for plan_id, n in paying.items() if n]
    totals: dict[str, Fraction] = defaultdict(Fraction)
    if ids:
        plans = select(_plan.c.id, _plan.c.currency, _plan.c.amount_minor, _plan.c.interval, _plan.c.interval_count)
        for plan_id, currency, amount_minor, interval, interval_count in conn.execute(plans.where(_plan.c.id.in_(ids))):
            totals[str(currency)] += amount_minor * paying[str(plan_id)] * monthly_share(interval, interval_count)
    return {currency: round(total) for currency, total in totals.items()}


def webhook_endpoints(conn: Connection, backlog: dict[str, int]) -> tuple[dict[str, int], dict[str, bool]]:
    """Each endpoint's backlog (deliveries not yet acknowledged) and whether it is failing, by endpoint id (the
    handle `billing webhooks list` shows; endpoints are few, added by operators)."""
    rows = conn.execute(select(_end.c.id, _end.c.status).where(_end.c.removed_at.is_(None)))
    pending: dict[str, int] = {}
    failing: dict[str, bool] = {}
    for endpoint_id, status in rows:
        pending[str(endpoint_id)] = backlog.get(str(endpoint_id), 0)
        failing[str(endpoint_id)] = status == "failing"
    return pending, failing


LIVE_QUERIES: dict[str, Callable[[Connection, datetime], Any]] = {
    "review_queue": review_queue,
    "due_lag": due_lag,
    "paused_reason": paused_reason,
    "refund_nearest_deadline": refund_nearest_deadline,
    "periodic_last_run": periodic_last_run,
}
HISTORY_QUERIES: dict[str, Callable[[Connection, datetime], Any]] = {"maintained": maintained}


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
    counts = maintained(conn, now)
    backlog, failing = webhook_endpoints(conn, _states(counts, "backlog", ()))
    return History(
        now=now,
        invoices=_states(counts, "invoices", (s.value for s in InvoiceState)),
        attempts=_attempts(counts),
        refunds=_states(counts, "refunds", (s.value for s in RefundState)),
        recovered_invoices=_states(counts, "recovered", ("",))[""],
        mrr_minor=mrr(conn, _states(counts, "paying", ())),
        webhook_backlog=backlog,
        webhook_failing=failing,
    )
