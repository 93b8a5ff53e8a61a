"""What a transaction report settles, decided without I/O (`review_import.plan`): the rules that keep a bulk import
from ever declaring a charged request uncharged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.services.errors import InvalidRequest
from billing.services.review_import import Attempt, Plan, covered_range, plan
from billing.services.tpaga_report import BadReport, ReportRow

T0 = datetime(2026, 3, 10, 13, 0, tzinfo=UTC)
MARGIN = timedelta(seconds=60)


def attempt(n: int, state: str = "unknown", *, charge_id: str | None = None, at: datetime = T0) -> Attempt:
    return Attempt(
        n, 100 + n, f"inv{100 + n}-a1", state, charge_id, 4_500_000, "COP", at, at, at + timedelta(seconds=5)
    )


def row(
    order_id: str, charge_id: str, *, status: str = "authorized", at: datetime = T0, amount: str = "45000.00"
) -> ReportRow:
    return ReportRow(2, order_id, charge_id, Decimal(amount), "COP", status, at + timedelta(seconds=1))


def decide(
    rows: list[ReportRow], attempts: list[Attempt], start: datetime, end: datetime, *, void_foreign: bool = False
) -> Plan:
    queue = [(a.invoice_id, a, "charge outcome unknown") for a in attempts if a.state == "unknown"]
    return plan(
        rows,
        by_charge={a.tpaga_charge_id: a for a in attempts if a.tpaga_charge_id},
        by_order={a.order_id: a for a in attempts},
        queue=queue,
        covered_from=start,
        covered_to=end,
        now=T0 + timedelta(hours=1),
        margin=MARGIN,
        void_foreign=void_foreign,
    )


def test_a_row_settles_its_attempt_and_a_covered_attempt_without_a_row_was_not_charged() -> None:
    charged, missing = attempt(1), attempt(2)
    todo = decide([row(charged.order_id, "c1")], [charged, missing], T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert [(r.charge_id, a.id) for r, a in todo.verify] == [("c1", 1)]
    assert [a.id for a in todo.not_charged] == [2]


@pytest.mark.parametrize(
    ("start", "end", "covered"),
    [
        (T0 - MARGIN, T0 + timedelta(hours=1), True),  # the request left exactly a margin after the start
        (T0 - MARGIN + timedelta(seconds=1), T0 + timedelta(hours=1), False),
        (T0 - timedelta(hours=1), T0 + timedelta(seconds=5) + MARGIN, True),  # flagged a margin before the end
        (T0 - timedelta(hours=1), T0 + timedelta(seconds=5) + MARGIN - timedelta(seconds=1), False),
    ],
)
def test_an_attempt_is_not_charged_only_when_every_moment_it_could_reach_tpaga_is_covered(
    start: datetime, end: datetime, covered: bool
) -> None:
    todo = decide([], [attempt(1)], start, end)
    assert bool(todo.not_charged) is covered
    assert [i.kind for i in todo.left] == ([] if covered else ["outside_range"])


def test_a_row_that_does_not_fit_its_attempt_is_listed_and_never_lets_it_pass_as_not_charged() -> None:
    a, b = attempt(1), attempt(2)
    rows = [row(a.order_id, "c1", amount="1.00"), row(b.order_id, "c2", at=T0 - timedelta(hours=2))]
    todo = decide(rows, [a, b], T0 - timedelta(hours=3), T0 + timedelta(hours=1))
    assert [d.kind for d in todo.discrepancies] == ["amount_differs", "too_early"]
    assert todo.verify == [] and todo.not_charged == []


def test_charges_this_database_does_not_know() -> None:
    settled = attempt(1, "approved", charge_id="c1")
    rows = [
        row(settled.order_id, "c1"),  # known
        row(settled.order_id, "c9"),  # a second charge of an order settled with c1
        row("inv555-a1", "c2"),  # an orderId of ours with no attempt (a restored database)
        row("inv556-a1", "c3", status="processor_declined"),  # unknown, but no money moved
        row("shop-17", "c4"),  # another shop on the same merchant account
    ]
    todo = decide(rows, [settled], T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert todo.known == 1
    assert [r.charge_id for r in todo.orphans] == ["c9", "c2"]
    assert [(d.kind, d.row.charge_id) for d in todo.discrepancies] == [
        ("unknown_charge", "c3"),
        ("foreign", "c4"),
    ]
    wider = decide(rows, [settled], T0 - timedelta(hours=1), T0 + timedelta(hours=1), void_foreign=True)
    assert [r.charge_id for r in wider.orphans] == ["c9", "c2", "c4"]


def test_late_charges_in_flight_attempts_and_known_charge_ids() -> None:
    gone = attempt(1, "not_sent")  # settled as not charged, and yet Tpaga charged it
    flying = attempt(2, "sending")
    with_id = attempt(3, charge_id="c3")  # Tpaga answered with an id: a GET settles it, report row or not
    rows = [row(gone.order_id, "c1"), row(flying.order_id, "c2")]
    todo = decide(rows, [gone, flying, with_id], T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    assert [a.id for _, a in todo.late] == [1]
    assert [d.kind for d in todo.discrepancies] == ["in_flight"]
    assert [a.id for a in todo.lookup] == [3] and todo.not_charged == []


def test_the_covered_range_is_the_one_given_or_the_span_of_the_rows() -> None:
    rows = [row("a", "c1", at=T0), row("b", "c2", at=T0 + timedelta(hours=2))]
    assert covered_range(rows, None, None) == (T0 + timedelta(seconds=1), T0 + timedelta(hours=2, seconds=1))
    assert covered_range([], None, None) == (None, None)
    with pytest.raises(BadReport, match="outside the range given"):
        covered_range(rows, T0 + timedelta(hours=1), None)
    with pytest.raises(InvalidRequest, match="--to must be after --from"):
        covered_range(rows, T0, T0)
