"""The public tasks other apps send by name with this product's ids (JSON keyword arguments); the commands by
the sender's own ids (attach_card and cancel_subscription among them) are in `tasks.commands`.

Each parses nothing itself (the base class checks the arguments against these signatures), calls one
service and returns a small dict of ids and outcomes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from billing.services import charging, refunds, voids
from tasks import config as names
from tasks.app import runtime, task
from tasks.errors import TaskInputError


@task(names.CHARGE_INVOICE)
def charge_invoice(*, invoice_id: int) -> dict[str, Any]:
    """Charge one open invoice now if it is due; idempotent (a paid invoice answers `already_paid`)."""
    return charging.charge_invoice(runtime.context(), invoice_id, pool=runtime.gateway_pool()).as_dict()


@task(names.CHARGE_INVOICES)
def charge_invoices(*, invoice_ids: list[int]) -> dict[str, Any]:
    """Charge a batch of open invoices (1 to 1000 ids), those due now, with the calls to Tpaga concurrent;
    idempotent per invoice like charge_invoice. Returns how many invoices ended in each outcome."""
    outcomes = charging.charge_invoices(runtime.context(), invoice_ids, pool=runtime.gateway_pool())
    return {"invoices": len(outcomes), "outcomes": dict(Counter(o.outcome for o in outcomes))}


@task(names.REQUEST_REFUND)
def request_refund(*, reason: str, invoice_id: int | None = None, charge_id: int | None = None) -> dict[str, Any]:
    """Record a refund (void) of an approved charge and enqueue its execution; idempotent.

    Name the charge by `invoice_id` (its approved charge), or by `charge_id` (the `attempt_id` that
    charge_invoice returned), which must be an approved charge: a declined one is refused.
    """
    if (invoice_id is None) == (charge_id is None):
        raise TaskInputError(f"{names.REQUEST_REFUND}: give exactly one of invoice_id or charge_id")
    outcome = refunds.request_refund(runtime.context(), reason=reason, invoice_id=invoice_id, attempt_id=charge_id)
    return {"invoice_id": outcome.invoice_id, **outcome.as_dict()}


@task(names.EXECUTE_REFUND)
def execute_refund(*, refund_id: int) -> dict[str, Any]:
    """Void a requested refund's charge at Tpaga if its window is open; expire it without calling Tpaga if not."""
    return voids.execute_refund(runtime.context(), refund_id).as_dict()
