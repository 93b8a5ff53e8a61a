"""Bulk reconciliation of the review queue against Tpaga's transaction report (docs/operations.md §8).

A report row whose orderId (or charge id) is an unknown attempt's settles it, after a GET of that charge id
confirms what the report says, exactly as `billing review resolve --charged` does; an unknown attempt whose
request could only have reached Tpaga inside the report's covered range, and that has no row, was not charged;
a row that matches no attempt is a charge this database does not know: listed, and voided inside the void
window when its orderId is one this system makes (`inv<invoice>-a<attempt>`).

`plan` decides from the report and the database alone (no I/O: a table test covers it); `apply` verifies at
Tpaga and settles, one checked transition per item, so importing the same report again changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.db.models import ChargeAttempt, Invoice
from billing.domain.money import Money, MoneyError
from billing.domain.refunds import refund_deadline
from billing.domain.states import AttemptState, InvoiceState
from billing.gateway import errors as gw
from billing.gateway.models import Charge
from billing.services import events
from billing.services.charging.outcomes import resolve_not_charged, settle_from_charge, settle_late_approval
from billing.services.context import Context
from billing.services.errors import InvalidRequest
from billing.services.operators import Actor
from billing.services.tpaga_report import BadReport, ReportRow

log = logging.getLogger("billing.review")

OUR_ORDER_ID = re.compile(r"inv\d+-a\d+")
# How far Tpaga's clock and ours may disagree, plus how long a request may take to be recorded there.
DEFAULT_CLOCK_MARGIN = timedelta(seconds=60)
IMPORT_ACTION = "review.import"
VOID_ACTION = "charge.void_orphan"
_CHUNK = 500


@dataclass(frozen=True)
class Attempt:
    """What the plan needs of one charge attempt."""

    id: int
    invoice_id: int
    order_id: str
    state: str
    tpaga_charge_id: str | None
    amount_minor: int
    currency: str
    created_at: datetime
    sent_at: datetime | None
    finished_at: datetime | None

    @property
    def left_at(self) -> datetime:
        """When the request may first have reached Tpaga."""
        return self.sent_at or self.created_at


@dataclass(frozen=True)
class Item:
    """One thing the import found: a row (or a review item) and what it means."""

    kind: str
    detail: str
    row: ReportRow | None = None
    attempt: Attempt | None = None
    invoice_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "detail": self.detail}
        if self.row is not None:
            out.update(
                line=self.row.line,
                order_id=self.row.order_id,
                charge_id=self.row.charge_id,
                amount=str(self.row.amount),
                currency=self.row.currency,
                status=self.row.status,
                date=self.row.date.isoformat(),
            )
        if self.attempt is not None:
            out.update(invoice_id=self.attempt.invoice_id, attempt_id=self.attempt.id, order_id=self.attempt.order_id)
        elif self.invoice_id is not None:
            out["invoice_id"] = self.invoice_id
        return out


@dataclass
class Plan:
    """What the report says to do; nothing done yet."""

    covered_from: datetime | None
    covered_to: datetime | None
    rows: int = 0
    known: int = 0
    verify: list[tuple[ReportRow, Attempt]] = field(default_factory=list)  # unknown attempts with their row
    late: list[tuple[ReportRow, Attempt]] = field(default_factory=list)  # not_sent attempts Tpaga charged
    lookup: list[Attempt] = field(default_factory=list)  # unknown attempts whose charge id we already have
    not_charged: list[Attempt] = field(default_factory=list)
    orphans: list[ReportRow] = field(default_factory=list)  # paid at Tpaga, unknown here: to void
    discrepancies: list[Item] = field(default_factory=list)  # rows a person must look at
    left: list[Item] = field(default_factory=list)  # review items the report cannot settle

    def summary(self) -> dict[str, Any]:
        return {
            "covered_from": self.covered_from.isoformat() if self.covered_from else None,
            "covered_to": self.covered_to.isoformat() if self.covered_to else None,
            "rows": self.rows,
            "known": self.known,
            "to_verify": len(self.verify) + len(self.late) + len(self.lookup),
            "not_charged": len(self.not_charged),
            "orphans_to_void": len(self.orphans),
            "discrepancies": [d.as_dict() for d in self.discrepancies],
            "left_in_review": [i.as_dict() for i in self.left],
        }


@dataclass
class Result:
    """What an import did."""

    plan: Plan
    settled: Counter[str] = field(default_factory=Counter)
    voided: list[Item] = field(default_factory=list)
    already_voided: int = 0
    discrepancies: list[Item] = field(default_factory=list)
    left: list[Item] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(sum(self.settled.values()) or self.voided)

    def as_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "covered_from": plan.covered_from.isoformat() if plan.covered_from else None,
            "covered_to": plan.covered_to.isoformat() if plan.covered_to else None,
            "rows": plan.rows,
            "known": plan.known,
            "settled": dict(sorted(self.settled.items())),
            "orphans_voided": [v.as_dict() for v in self.voided],
            "orphans_already_voided": self.already_voided,
            "discrepancies": [d.as_dict() for d in self.discrepancies],
            "left_in_review": [i.as_dict() for i in self.left],
        }


# --- the plan (no I/O) -------------------------------------------------------------------------------------


def covered_range(
    rows: Sequence[ReportRow], covered_from: datetime | None, covered_to: datetime | None
) -> tuple[datetime | None, datetime | None]:
    """The range the report is complete for: the one given, else the span of its own rows (never wider than
    what it shows). A row outside a given range means the range is not the report's: refused."""
    if covered_from is not None and covered_to is not None and covered_from >= covered_to:
        raise InvalidRequest("--to must be after --from")
    for row in rows:
        if (covered_from is not None and row.date < covered_from) or (
            covered_to is not None and row.date >= covered_to
        ):
            raise BadReport(
                f"line {row.line}: charge {row.charge_id} of {row.date.isoformat()} is outside the range given "
                "(--from/--to must be the range the report was exported for)"
            )
    dates = [row.date for row in rows]
    start = covered_from if covered_from is not None else (min(dates) if dates else None)
    end = covered_to if covered_to is not None else (max(dates) if dates else None)
    return start, end


def plan(
    rows: Sequence[ReportRow],
    *,
    by_charge: dict[str, Attempt],
    by_order: dict[str, Attempt],
    queue: Sequence[tuple[int, Attempt | None, str | None]],
    covered_from: datetime | None,
    covered_to: datetime | None,
    now: datetime,
    margin: timedelta = DEFAULT_CLOCK_MARGIN,
    void_foreign: bool = False,
) -> Plan:
    """Decide, row by row and then item by item of the review queue (`queue`: invoice id, its unknown attempt,
    its review reason), what the report settles."""
    result = Plan(covered_from, covered_to)
    unique = list({row.charge_id: row for row in rows}.values())
    result.rows = len(unique)
    claimed: set[int] = set()
    for row in unique:
        attempt = by_charge.get(row.charge_id)
        if attempt is not None:
            if attempt.state == AttemptState.UNKNOWN:
                _verify(result, row, attempt, claimed, margin)
            else:
                result.known += 1
            continue
        attempt = by_order.get(row.order_id) if row.order_id else None
        if attempt is None or attempt.tpaga_charge_id:
            # No attempt, or an attempt settled with another charge: Tpaga holds a charge this database does not.
            _orphan(result, row, attempt, void_foreign)
        elif attempt.state == AttemptState.UNKNOWN:
            _verify(result, row, attempt, claimed, margin)
        elif attempt.state == AttemptState.NOT_SENT and row.authorized:
            if _consistent(result, row, attempt, margin):
                result.late.append((row, attempt))
        elif attempt.state in (AttemptState.PENDING, AttemptState.SENDING):
            result.discrepancies.append(Item("in_flight", "its attempt is in flight: import again later", row, attempt))
        else:
            result.known += 1
    for invoice_id, attempt, reason in queue:
        if attempt is None:
            result.left.append(Item("not_a_charge_question", reason or "no unknown attempt", invoice_id=invoice_id))
        elif attempt.id in claimed:
            continue
        elif attempt.tpaga_charge_id:
            result.lookup.append(attempt)
        elif _covered(attempt, covered_from, covered_to, now, margin):
            result.not_charged.append(attempt)
        else:
            result.left.append(
                Item("outside_range", "its request may have reached Tpaga outside the report's range", attempt=attempt)
            )
    return result


def _verify(result: Plan, row: ReportRow, attempt: Attempt, claimed: set[int], margin: timedelta) -> None:
    if attempt.id in claimed:
        result.discrepancies.append(
            Item("second_charge", "another row already matches this attempt: two charges?", row, attempt)
        )
    elif _consistent(result, row, attempt, margin):
        result.verify.append((row, attempt))
        claimed.add(attempt.id)
    else:
        claimed.add(attempt.id)  # a row names it but does not fit: never "not charged" on this report


def _consistent(result: Plan, row: ReportRow, attempt: Attempt, margin: timedelta) -> bool:
    """The row could be this attempt's charge: same amount and currency, dated after the attempt existed."""
    try:
        same_money = Money.from_major(row.amount, row.currency) == Money(attempt.amount_minor, attempt.currency)
    except MoneyError:
        same_money = False
    if not same_money:
        result.discrepancies.append(
            Item("amount_differs", f"the attempt is for {attempt.amount_minor} minor {attempt.currency}", row, attempt)
        )
        return False
    if row.date < attempt.created_at - margin:
        result.discrepancies.append(Item("too_early", "charged before this attempt existed", row, attempt))
        return False
    return True


def _orphan(result: Plan, row: ReportRow, attempt: Attempt | None, void_foreign: bool) -> None:
    what = "matches no attempt" if attempt is None else f"is a second charge of {row.order_id}"
    if not row.authorized:
        result.discrepancies.append(Item("unknown_charge", f"{what}; {row.status} at Tpaga: no money to return", row))
    elif OUR_ORDER_ID.fullmatch(row.order_id) or void_foreign:
        result.orphans.append(row)
    else:
        result.discrepancies.append(
            Item("foreign", f"{what}, with an orderId this system never makes: not voided (--void-foreign)", row)
        )


def _covered(attempt: Attempt, start: datetime | None, end: datetime | None, now: datetime, margin: timedelta) -> bool:
    """Whether every moment the request could have reached Tpaga (from leaving to being flagged) is inside the
    covered range, with `margin` for the two clocks."""
    if start is None or end is None:
        return False
    finished = attempt.finished_at or now
    return start + margin <= attempt.left_at and finished + margin <= end


# --- the database side -------------------------------------------------------------------------------------


def _attempt(row: ChargeAttempt) -> Attempt:
    return Attempt(
        row.id,
        row.invoice_id,
        row.order_id,
        str(row.state),
        row.tpaga_charge_id,
        row.amount_minor,
        row.currency,
        row.created_at,
        row.sent_at,
        row.finished_at,
    )


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(set(values))
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def load(session: Session, rows: Sequence[ReportRow]) -> tuple[dict[str, Attempt], dict[str, Attempt], list[Any]]:
    """The attempts the rows name (by charge id and by orderId) and the whole review queue."""
    by_charge: dict[str, Attempt] = {}
    by_order: dict[str, Attempt] = {}
    for chunk in _chunks(r.charge_id for r in rows):
        for att in session.execute(select(ChargeAttempt).where(ChargeAttempt.tpaga_charge_id.in_(chunk))).scalars():
            by_charge[str(att.tpaga_charge_id)] = _attempt(att)
    for chunk in _chunks(r.order_id for r in rows if r.order_id):
        for att in session.execute(select(ChargeAttempt).where(ChargeAttempt.order_id.in_(chunk))).scalars():
            by_order[att.order_id] = _attempt(att)
    queue = session.execute(
        select(Invoice.id, ChargeAttempt, Invoice.review_reason)
        .outerjoin(
            ChargeAttempt,
            (ChargeAttempt.invoice_id == Invoice.id) & (ChargeAttempt.state == AttemptState.UNKNOWN),
        )
        .where(Invoice.state == InvoiceState.REVIEW)
        .order_by(Invoice.updated_at, Invoice.id)
    ).all()
    return by_charge, by_order, [(i, _attempt(a) if a is not None else None, r) for i, a, r in queue]


def prepare(
    ctx: Context,
    rows: Sequence[ReportRow],
    *,
    covered_from: datetime | None = None,
    covered_to: datetime | None = None,
    margin: timedelta = DEFAULT_CLOCK_MARGIN,
    void_foreign: bool = False,
) -> Plan:
    """The plan for this report against the database as it is now."""
    start, end = covered_range(rows, covered_from, covered_to)
    now = ctx.clock.now()
    with ctx.sessions() as session:
        by_charge, by_order, queue = load(session, rows)
    return plan(
        rows,
        by_charge=by_charge,
        by_order=by_order,
        queue=queue,
        covered_from=start,
        covered_to=end,
        now=now,
        margin=margin,
        void_foreign=void_foreign,
    )


# --- applying it -------------------------------------------------------------------------------------------


def import_report(
    ctx: Context,
    rows: Sequence[ReportRow],
    *,
    actor: Actor,
    source: str,
    digest: str,
    covered_from: datetime | None = None,
    covered_to: datetime | None = None,
    margin: timedelta = DEFAULT_CLOCK_MARGIN,
    void_foreign: bool = False,
) -> Result:
    """Plan, verify at Tpaga, settle; every change carries the `actor`. `source` and `digest` (the file's name
    and SHA-256) go into the audit events, so an import can be traced to the very file."""
    todo = prepare(
        ctx, rows, covered_from=covered_from, covered_to=covered_to, margin=margin, void_foreign=void_foreign
    )
    result = Result(todo, discrepancies=list(todo.discrepancies), left=list(todo.left))
    audit: dict[str, Any] = {"report": source, "report_sha256": digest}
    for row, attempt in todo.verify:
        _settle_unknown(ctx, result, actor, audit, attempt, row)
    for attempt in todo.lookup:
        _settle_unknown(ctx, result, actor, audit, attempt, None)
    for row, attempt in todo.late:
        _settle_late(ctx, result, actor, audit, row, attempt)
    for attempt in todo.not_charged:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            if resolve_not_charged(session, now, attempt.invoice_id, attempt.id):
                actor.record(
                    session,
                    now,
                    IMPORT_ACTION,
                    invoice_id=attempt.invoice_id,
                    attempt_id=attempt.id,
                    outcome="not_charged",
                    **audit,
                )
                result.settled["not_charged"] += 1
    for row in todo.orphans:
        _void_orphan(ctx, result, actor, audit, row)
    if result.changed:
        now = ctx.clock.now()
        with ctx.unit_of_work() as session:
            summary = result.as_dict()
            events.record(
                session,
                now,
                "review.imported",
                by=actor.by,
                reason=actor.reason,
                covered_from=summary["covered_from"],
                covered_to=summary["covered_to"],
                rows=summary["rows"],
                settled=summary["settled"],
                orphans_voided=[v["charge_id"] for v in summary["orphans_voided"]],
                discrepancies=len(summary["discrepancies"]),
                left_in_review=len(summary["left_in_review"]),
                **audit,
            )
    return result


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lookup(
    ctx: Context, result: Result, charge_id: str, row: ReportRow | None, attempt: Attempt | None
) -> Charge | None:
    """GET the charge; a failure is listed (a person looks) or left for another import."""
    try:
        return ctx.gateway.get_charge(charge_id)
    except gw.NotFoundError:
        result.discrepancies.append(Item("not_at_tpaga", f"Tpaga has no charge {charge_id}", row, attempt))
    except gw.TpagaError as exc:
        result.left.append(
            Item("lookup_failed", f"the lookup failed ({type(exc).__name__}): import again", row, attempt)
        )
    return None


def _settle_unknown(
    ctx: Context, result: Result, actor: Actor, audit: dict[str, Any], attempt: Attempt, row: ReportRow | None
) -> None:
    charge_id = row.charge_id if row is not None else str(attempt.tpaga_charge_id)
    charge = _lookup(ctx, result, charge_id, row, attempt)
    if charge is None:
        return
    if charge.order_id != attempt.order_id:
        result.discrepancies.append(
            Item("other_order", f"Tpaga says charge {charge_id} is for order {charge.order_id!r}", row, attempt)
        )
        return

    def note(session: Session, now: datetime, outcome: str) -> None:
        actor.record(
            session,
            now,
            IMPORT_ACTION,
            invoice_id=attempt.invoice_id,
            attempt_id=attempt.id,
            outcome=outcome,
            charge_id=charge_id,
            **audit,
        )

    outcome = settle_from_charge(ctx, attempt.invoice_id, attempt.id, charge, by="import", note=note)
    if outcome == "still_unknown":
        result.left.append(Item("still_unknown", "Tpaga's own record of the charge is not final", row, attempt))
    else:
        result.settled[outcome] += 1


def _settle_late(
    ctx: Context, result: Result, actor: Actor, audit: dict[str, Any], row: ReportRow, attempt: Attempt
) -> None:
    charge = _lookup(ctx, result, row.charge_id, row, attempt)
    if charge is None:
        return
    if charge.order_id != attempt.order_id or not charge.paid:
        result.discrepancies.append(
            Item("report_differs", f"Tpaga says: order {charge.order_id!r}, {charge.status}", row, attempt)
        )
        return

    def note(session: Session, now: datetime, outcome: str) -> None:
        actor.record(
            session,
            now,
            IMPORT_ACTION,
            invoice_id=attempt.invoice_id,
            attempt_id=attempt.id,
            outcome=f"late_{outcome}",
            charge_id=row.charge_id,
            **audit,
        )

    outcome = settle_late_approval(ctx, attempt.invoice_id, attempt.id, charge, note=note)
    if outcome != "unchanged":
        result.settled[f"late_{outcome}"] += 1


def _void_orphan(ctx: Context, result: Result, actor: Actor, audit: dict[str, Any], row: ReportRow) -> None:
    """Void a charge Tpaga holds and this database does not, inside the void window; else list it."""
    charge = _lookup(ctx, result, row.charge_id, row, None)
    if charge is None:
        return
    if (charge.order_id or "") != row.order_id:
        result.discrepancies.append(
            Item("report_differs", f"Tpaga says charge {row.charge_id} is for order {charge.order_id!r}", row)
        )
        return
    if charge.voided:
        result.already_voided += 1
        return
    if not charge.paid:
        result.discrepancies.append(Item("unknown_charge", f"not paid at Tpaga ({charge.status})", row))
        return
    deadline = refund_deadline(charge.date_created or row.date, ctx.refund_window, ctx.refund_safety_margin)
    if ctx.clock.now() >= deadline:
        result.discrepancies.append(
            Item("orphan_past_window", "charged, unknown here, and past the void window: refund it by hand", row)
        )
        return
    try:
        ctx.gateway.refund(charge.id)
    except gw.RefundRejectedError as exc:
        if exc.charge is not None and exc.charge.voided:
            result.already_voided += 1
        else:
            result.discrepancies.append(Item("void_refused", "Tpaga refused the void (406)", row))
        return
    except gw.TpagaError as exc:
        # A void is idempotent at Tpaga: the next import finds it voided or voids it.
        result.left.append(Item("void_unknown", f"the void did not complete ({type(exc).__name__}): import again", row))
        return
    log.info("voided charge %s (orderId %r) unknown to this database", charge.id, row.order_id)
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        actor.record(
            session,
            now,
            VOID_ACTION,
            charge_id=charge.id,
            order_id=row.order_id,
            amount=str(row.amount),
            currency=row.currency,
            **audit,
        )
    result.voided.append(Item("voided", "voided at Tpaga: it matched no attempt here", row))
