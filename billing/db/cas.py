"""Checked state writes: every change of a stored state is a compare-and-set whose from-states come from the
domain's transition tables, and whose result the caller must act on.

`transition` and `transition_rows` return what this caller changed; an effect on another row (the invoice
paid, dunning applied, an event) belongs only to a change that happened. A refused change (another writer
settled the row first, or the change is not in the table) is logged and leaves a `state.conflict` event
saying what it found, so that a lost race is visible instead of silent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import ChargeAttempt, Event, Invoice, Refund, Subscription
from billing.domain.states import (
    ATTEMPT_TRANSITIONS,
    INVOICE_TRANSITIONS,
    REFUND_TRANSITIONS,
    SUBSCRIPTION_TRANSITIONS,
    sources,
)

log = logging.getLogger("billing.cas")

CONFLICT_KIND = "state.conflict"


@dataclass(frozen=True)
class Machine:
    """Where a model keeps its state, which table governs it, and which event column names its rows."""

    column: str
    transitions: Mapping[Any, frozenset[Any]]
    event_key: str


MACHINES: dict[type[Any], Machine] = {
    ChargeAttempt: Machine("state", ATTEMPT_TRANSITIONS, "attempt_id"),
    Invoice: Machine("state", INVOICE_TRANSITIONS, "invoice_id"),
    Subscription: Machine("status", SUBSCRIPTION_TRANSITIONS, "subscription_id"),
    Refund: Machine("state", REFUND_TRANSITIONS, "refund_id"),
}


def from_states(model: type[Any], to: StrEnum) -> tuple[Any, ...]:
    """The states a row of `model` may be in for a change to `to` (from the domain's table)."""
    found = sources(MACHINES[model].transitions, to)
    if not found:
        raise ValueError(f"no state of {model.__name__} may change to {to!r}")
    return found


def transition(session: Session, model: type[Any], row_id: int, to: StrEnum, *, now: datetime, **values: Any) -> bool:
    """Move one row to `to` (with `values`) if its state allows it; True when this caller made the change."""
    machine = MACHINES[model]
    column = getattr(model, machine.column)
    result = session.execute(
        update(model)
        .where(model.id == row_id, column.in_(from_states(model, to)))
        .values({machine.column: to, **values})
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        return True
    _refused(session, model, [row_id], to, now)
    return False


def transition_rows(
    session: Session, model: type[Any], rows: Sequence[dict[str, Any]], to: StrEnum, *, now: datetime
) -> dict[int, Any]:
    """`transition` for many rows ({"id": ..., column: value, ...}, all with the same keys): lock them, write
    those whose state allows the change, and return {id: the state it was in} for every row written."""
    if not rows:
        return {}
    machine = MACHINES[model]
    allowed = from_states(model, to)
    current = bulk.lock_rows(session, model, [r["id"] for r in rows], machine.column)
    before = {i: getattr(row, machine.column) for i, row in current.items()}
    moved = [{**r, machine.column: to} for r in rows if before.get(r["id"]) in allowed]
    bulk.update_rows(session, model, moved)
    done = {r["id"] for r in moved}
    refused = [r["id"] for r in rows if r["id"] not in done]
    if refused:
        _refused(session, model, refused, to, now, before)
    return {i: before[i] for i in done}


def transition_ids(
    session: Session, model: type[Any], ids: Sequence[int], to: StrEnum, *, now: datetime, **values: Any
) -> list[int]:
    """`transition` of many rows to the same values; returns the ids written."""
    moved = transition_rows(session, model, [{"id": i, **values} for i in ids], to, now=now)
    return [i for i in ids if i in moved]


def transition_locked(
    session: Session, model: type[Any], current: Mapping[int, Any], to: StrEnum, *, now: datetime, **values: Any
) -> list[int]:
    """`transition` of rows this transaction has locked, whose states (`current`: id -> state) it read under the
    lock: the check is made here, and the rows that may change are written with one statement."""
    allowed = from_states(model, to)
    moved = sorted(i for i, state in current.items() if state in allowed)
    if moved:
        bulk.update_ids(session, model, moved, **{MACHINES[model].column: to, **values})
    refused = [i for i in current if i not in set(moved)]
    if refused:
        _refused(session, model, refused, to, now, current)
    return moved


def update_while(session: Session, model: type[Any], row_id: int, state: StrEnum, **values: Any) -> bool:
    """Write `values` (not the state) to a row only while it is in `state`; True when it was."""
    column = getattr(model, MACHINES[model].column)
    result = session.execute(
        update(model)
        .where(model.id == row_id, column == state)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _refused(
    session: Session,
    model: type[Any],
    ids: Sequence[int],
    to: StrEnum,
    now: datetime,
    found: Mapping[int, Any] | None = None,
) -> None:
    machine = MACHINES[model]
    if found is None:
        column = getattr(model, machine.column)
        found = dict(session.execute(select(model.id, column).where(model.id.in_(list(ids)))).all())
    rows = []
    for row_id in ids:
        state = found.get(row_id)
        if state == to:
            continue  # a repeat of a change already made (a redelivery, a retried commit): nothing to flag
        state_name = None if state is None else str(state)
        log.warning("refused %s %s -> %s: found %s", model.__tablename__, row_id, to, state_name or "no such row")
        data = {"entity": model.__tablename__, "wanted": str(to), "found": state_name}
        rows.append(
            {
                "at": now,
                "kind": CONFLICT_KIND,
                "subscription_id": None,
                "invoice_id": None,
                "attempt_id": None,
                "refund_id": None,
                machine.event_key: row_id,
                "data": data,
            }
        )
    if rows:
        bulk.insert_rows(session, Event, rows)
