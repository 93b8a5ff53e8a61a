"""The commands other apps send by their own ids (docs/tasks.md): plans by code, customers and subscriptions by
external id, each with an optional `request_id` and `issued_at`.

Thin like the other tasks: the base class checks the kwargs' JSON types, these parse the times and call one
service in `billing.services.commands`. A command naming an object not there yet is retried for
BILLING_COMMAND_WAIT_SECONDS (`BillingTask.wait_for`); every other refusal fails once, with its reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.gateway import errors as gw
from billing.services import commands
from billing.services.ledger import Meta
from tasks import config as names
from tasks.app import runtime, task
from tasks.errors import GatewayError, TaskInputError, TransientError


def _time(task_name: str, name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise TaskInputError(
            f"{task_name}: {name} must be an ISO 8601 time with a UTC offset, such as 2026-12-01T09:00:00-05:00; "
            f"got {value[:40]!r}"
        )
    return parsed


def _meta(task_name: str, request_id: str | None, issued_at: str | None) -> Meta:
    if request_id is not None and not 1 <= len(request_id) <= 128:
        raise TaskInputError(f"{task_name}: request_id must be 1 to 128 characters, got {len(request_id)}")
    return Meta(request_id=request_id, issued_at=_time(task_name, "issued_at", issued_at))


def _gateway_call(task_name: str, call: Any, /, **kwargs: Any) -> dict[str, Any]:
    """Run a command that calls Tpaga, mapping what Tpaga did to how the task fails (no ids, no tokens)."""
    failure: Exception | None = None
    ctx = runtime.context()  # outside the try: a ConfigError is a ValueError, not a malformed token
    try:
        return dict(call(ctx, **kwargs))
    except ValueError as exc:  # the client refused the token's shape before sending (its messages echo no values)
        if isinstance(exc, gw.TpagaError):
            raise
        failure = TaskInputError(f"{task_name}: token is malformed (whitespace or control characters)")
    except gw.NotSentError:
        failure = TransientError("Tpaga was not reached; nothing was sent")
    except gw.OutcomeUnknownError:
        # Only upsert_customer gets here (attach_card records a lost answer itself): the pending customer's
        # lease runs out, then a retry creates it.
        failure = TransientError("Tpaga's answer was lost; the customer is created on a retry")
    except gw.TpagaError as exc:
        failure = GatewayError(f"{task_name}: Tpaga refused ({type(exc).__name__}, HTTP {exc.http_status})")
    assert failure is not None
    raise failure  # outside the except blocks: the gateway error is not chained into the traceback


@task(names.UPSERT_PLAN)
def upsert_plan(
    *,
    code: str,
    amount: str,
    currency: str,
    interval: str,
    interval_count: int = 1,
    trial_days: int = 0,
    name: str | None = None,
    tax: str = "excluded",
    tax_rate: int | None = None,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Create a plan by its code; the same terms again are a no-op, other terms are refused once it is in use."""
    return commands.upsert_plan(
        runtime.context(),
        code=code,
        amount=amount,
        currency=currency,
        interval=interval,
        interval_count=interval_count,
        trial_days=trial_days,
        name=name,
        tax=tax,
        tax_rate=tax_rate,
        meta=_meta(names.UPSERT_PLAN, request_id, issued_at),
    )


@task(names.UPSERT_CUSTOMER)
def upsert_customer(
    *,
    external_id: str,
    email: str,
    first_name: str,
    last_name: str,
    phone: str | None = None,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Create the customer here and at Tpaga exactly once; a repeat replaces the local fields (no phone: none)."""
    return _gateway_call(
        names.UPSERT_CUSTOMER,
        commands.upsert_customer,
        external_id=external_id,
        email=email,
        first_name=first_name,
        last_name=last_name,
        phone=phone,
        meta=_meta(names.UPSERT_CUSTOMER, request_id, issued_at),
    )


@task(names.ATTACH_CARD)
def attach_card(
    *,
    token: str,
    customer_id: int | None = None,
    external_customer_id: str | None = None,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Associate a card from Tpaga's temporary token (by `external_customer_id` or `customer_id`); the same token
    again returns the first result. A usable card retries the customer's waiting invoices.

    The token is masked in argsrepr/kwargsrepr and never appears in a result or an error message.
    """
    return _gateway_call(
        names.ATTACH_CARD,
        commands.attach_card_result,
        token=token,
        customer_id=customer_id,
        external_customer_id=external_customer_id,
        meta=_meta(names.ATTACH_CARD, request_id, issued_at),
    )


@task(names.CREATE_SUBSCRIPTION)
def create_subscription(
    *,
    external_id: str,
    external_customer_id: str,
    plan_code: str,
    trial_days: int | None = None,
    anchor_at: str | None = None,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Create the subscription once; the same terms again return it; other terms for its external_id are refused."""
    return commands.create_subscription(
        runtime.context(),
        external_id=external_id,
        external_customer_id=external_customer_id,
        plan_code=plan_code,
        trial_days=trial_days,
        anchor_at=_time(names.CREATE_SUBSCRIPTION, "anchor_at", anchor_at),
        meta=_meta(names.CREATE_SUBSCRIPTION, request_id, issued_at),
    )


@task(names.CANCEL_SUBSCRIPTION)
def cancel_subscription(
    *,
    subscription_id: int | None = None,
    external_subscription_id: str | None = None,
    at_period_end: bool = False,
    refund_last_charge: bool = False,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Cancel now (open invoices without a charge in flight are voided) or at the period's end; optionally
    request a refund of the last paid invoice (executed only inside the void window)."""
    return commands.cancel_subscription(
        runtime.context(),
        subscription_id=subscription_id,
        external_subscription_id=external_subscription_id,
        at_period_end=at_period_end,
        refund_last_charge=refund_last_charge,
        meta=_meta(names.CANCEL_SUBSCRIPTION, request_id, issued_at),
    )


@task(names.PAUSE_SUBSCRIPTION)
def pause_subscription(
    *,
    external_subscription_id: str,
    resumes_at: str | None = None,
    request_id: str | None = None,
    issued_at: str | None = None,
) -> dict[str, Any]:
    """Pause: no invoice is opened and nothing is charged until resumed (by command, or at `resumes_at`)."""
    return commands.pause_subscription(
        runtime.context(),
        external_subscription_id=external_subscription_id,
        resumes_at=_time(names.PAUSE_SUBSCRIPTION, "resumes_at", resumes_at),
        meta=_meta(names.PAUSE_SUBSCRIPTION, request_id, issued_at),
    )


@task(names.RESUME_SUBSCRIPTION)
def resume_subscription(
    *, external_subscription_id: str, request_id: str | None = None, issued_at: str | None = None
) -> dict[str, Any]:
    """Resume: the anchor is kept; the current period is billed if it became due, the skipped ones never."""
    return commands.resume_subscription(
        runtime.context(),
        external_subscription_id=external_subscription_id,
        meta=_meta(names.RESUME_SUBSCRIPTION, request_id, issued_at),
    )
