"""The public tasks other apps send by name (JSON keyword arguments, ids only except attach_card's token).

Each parses nothing itself (the base class checks the arguments against these signatures), calls one
service and returns a small dict of ids and outcomes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from billing.gateway import errors as gw
from billing.services import catalog, charging, refunds, subscriptions, voids
from tasks import config as names
from tasks.app import runtime, task
from tasks.errors import GatewayError, TaskInputError, TransientError


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


@task(names.ATTACH_CARD)
def attach_card(*, customer_id: int, token: str) -> dict[str, Any]:
    """Associate a card from Tpaga's temporary token; a usable card retries the customer's waiting invoices.

    The token is masked in argsrepr/kwargsrepr and never appears in a result or an error message.
    """
    failure: Exception | None = None
    ctx = runtime.context()  # outside the try: a ConfigError is a ValueError, not a malformed token
    try:
        card_id = catalog.attach_card(ctx, customer_id=customer_id, token=token)
    except ValueError:  # the client refused the token's shape before sending (its messages echo no values)
        failure = TaskInputError(f"{names.ATTACH_CARD}: token is malformed (whitespace or control characters)")
    except gw.NotSentError:
        failure = TransientError("Tpaga was not reached; nothing was sent")
    except (gw.ValidationError, gw.NotFoundError) as exc:
        failure = TaskInputError(
            f"{names.ATTACH_CARD}: Tpaga refused the token (HTTP {exc.http_status}): "
            "it is unknown, expired or already used"
        )
    except gw.OutcomeUnknownError:
        # The token is single-use: a retry cannot succeed, and the card may exist at Tpaga already.
        failure = GatewayError(f"{names.ATTACH_CARD}: Tpaga's answer was lost; the card may be associated there")
    except gw.TpagaError as exc:
        failure = GatewayError(f"{names.ATTACH_CARD}: Tpaga refused ({type(exc).__name__}, HTTP {exc.http_status})")
    if failure is not None:
        raise failure  # outside the except blocks: the gateway error is not chained into the traceback
    return {"customer_id": customer_id, "card_id": card_id}


@task(names.CANCEL_SUBSCRIPTION)
def cancel_subscription(
    *, subscription_id: int, at_period_end: bool = False, refund_last_charge: bool = False
) -> dict[str, Any]:
    """Cancel now (open invoices without a charge in flight are voided) or at the period's end; optionally
    request a refund of the last paid invoice (executed only inside the void window)."""
    return subscriptions.cancel_subscription(
        runtime.context(),
        subscription_id=subscription_id,
        at_period_end=at_period_end,
        refund_last_charge=refund_last_charge,
    )


@task(names.EXECUTE_REFUND)
def execute_refund(*, refund_id: int) -> dict[str, Any]:
    """Void a requested refund's charge at Tpaga if its window is open; expire it without calling Tpaga if not."""
    return voids.execute_refund(runtime.context(), refund_id).as_dict()
