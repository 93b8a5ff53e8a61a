"""Helpers for apps that send the billing tasks: the right queue, JSON kwargs, and masked reprs (docs/tasks.md).

Another app does not need this package: any Celery app can `send_task("billing.charge_invoice",
kwargs={"invoice_id": 42}, queue="billing.charges")` (queues in `ROUTES`). What it does need for
`billing.attach_card` is to set `kwargsrepr`, or its own `task-sent` event (when it has
`task_send_sent_event` on) and its own logs would show the token; the helpers here do that.

One typed helper per command (`upsert_plan`, `upsert_customer`, `attach_card`, `create_subscription`,
`cancel_subscription`, `pause_subscription`, `resume_subscription`): each takes the sender's own Celery app
(or None for this project's), converts datetimes to ISO 8601 strings and amounts to decimal strings, leaves
out the arguments left at None (so a message names only what the sender chose), and returns the task id.
Mistakes the worker would refuse anyway and that a type checker cannot see (a float amount, a datetime
without a time zone, both or neither of two alternative ids) raise ValueError here, before anything is sent.

Importing this module reads no settings and starts nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from tasks.config import (
    ATTACH_CARD,
    CANCEL_SUBSCRIPTION,
    CREATE_SUBSCRIPTION,
    DEFAULT,
    KWARGS,
    PAUSE_SUBSCRIPTION,
    RESUME_SUBSCRIPTION,
    ROUTES,
    SECRET_KWARGS,
    UPSERT_CUSTOMER,
    UPSERT_PLAN,
)
from tasks.masking import masked_reprs

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "COMMAND_HELPERS",
    "ROUTES",
    "attach_card",
    "cancel_subscription",
    "create_subscription",
    "pause_subscription",
    "resume_subscription",
    "send",
    "send_attach_card",
    "upsert_customer",
    "upsert_plan",
]

IntervalName = Literal["day", "week", "month", "year"]
TaxName = Literal["iva", "inc", "excluded", "exempt"]
When = datetime | str  # a str is sent as given (the worker checks it is ISO 8601 with an offset)


def send(app: Celery | None, name: str, /, **kwargs: Any) -> str:
    """Send task `name` with keyword arguments to its queue; returns the task id.

    Positional-only, so that a task's own `name` or `app` argument (`billing.upsert_plan` has a `name`) is a
    keyword argument of the task.

    `app` is the sender's own Celery app (configured with the billing broker), or None for this project's, which
    then reads its settings (the environment and `.env`) if nothing has yet.
    """
    if app is None:
        from tasks import app as own_app

        app = own_app
    argsrepr, kwargsrepr = masked_reprs((), kwargs, KWARGS.get(name, ()), SECRET_KWARGS.get(name, frozenset()))
    result = app.send_task(
        name,
        kwargs=kwargs,
        queue=ROUTES.get(name, DEFAULT),
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
    )
    return str(result.id)


def send_attach_card(app: Celery | None, customer_id: int, token: str) -> str:
    """Send `billing.attach_card` by our customer id with the token masked in the message's reprs; returns the
    task id (`attach_card` also takes the sender's `external_customer_id`)."""
    return send(app, ATTACH_CARD, customer_id=customer_id, token=token)


# --- the commands ----------------------------------------------------------------------------------------


def _when(name: str, value: When | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        # A naive time is ambiguous across machines; the worker would refuse it.
        raise ValueError(f"{name} must be a datetime with a time zone (or an ISO 8601 string with an offset)")
    return value.isoformat()


def _amount(value: Decimal | str | int) -> str:
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int):
        # A float is not exact (0.1 + 0.2); money travels as a decimal string.
        raise ValueError(f"amount must be a Decimal, str or int, got a {type(value).__name__}")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"amount must be a finite number, got {value}")
        return format(value, "f")  # never the exponent form str() may give (Decimal('4.5E+4'))
    return str(value)


def _one_of(first: str, a: object, second: str, b: object) -> None:
    if (a is None) == (b is None):
        raise ValueError(f"give exactly one of {first} or {second}")


def _command(app: Celery | None, task_name: str, meta: tuple[str | None, When | None], /, **kwargs: Any) -> str:
    request_id, issued_at = meta
    kwargs.update(request_id=request_id, issued_at=_when("issued_at", issued_at))
    return send(app, task_name, **{key: value for key, value in kwargs.items() if value is not None})


def upsert_plan(
    app: Celery | None,
    *,
    code: str,
    amount: Decimal | str | int,
    currency: str,
    interval: IntervalName,
    interval_count: int = 1,
    trial_days: int = 0,
    name: str | None = None,
    tax: TaxName | None = None,
    tax_rate: int | None = None,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.upsert_plan`: create plan `code` (the same terms again are a no-op); returns the task id.
    `tax` (iva, inc, excluded, exempt) defaults to excluded at the worker, `tax_rate` to the treatment's own."""
    return _command(
        app,
        UPSERT_PLAN,
        (request_id, issued_at),
        code=code,
        amount=_amount(amount),
        currency=currency,
        interval=interval,
        interval_count=interval_count,
        trial_days=trial_days,
        name=name,
        tax=tax,
        tax_rate=tax_rate,
    )


def upsert_customer(
    app: Celery | None,
    *,
    external_id: str,
    email: str,
    first_name: str,
    last_name: str,
    phone: str | None = None,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.upsert_customer`: create the customer here and at Tpaga once, or update its local fields."""
    return _command(
        app,
        UPSERT_CUSTOMER,
        (request_id, issued_at),
        external_id=external_id,
        email=email,
        first_name=first_name,
        last_name=last_name,
        phone=phone,
    )


def attach_card(
    app: Celery | None,
    *,
    token: str,
    external_customer_id: str | None = None,
    customer_id: int | None = None,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.attach_card` for a customer named by `external_customer_id` (or our `customer_id`), with the
    single-use token from Tpaga's tokenize masked in the message's reprs; returns the task id."""
    _one_of("external_customer_id", external_customer_id, "customer_id", customer_id)
    return _command(
        app,
        ATTACH_CARD,
        (request_id, issued_at),
        token=token,
        external_customer_id=external_customer_id,
        customer_id=customer_id,
    )


def create_subscription(
    app: Celery | None,
    *,
    external_id: str,
    external_customer_id: str,
    plan_code: str,
    trial_days: int | None = None,
    anchor_at: When | None = None,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.create_subscription` (trial_days None: the plan's; anchor_at None: now or the trial's end)."""
    return _command(
        app,
        CREATE_SUBSCRIPTION,
        (request_id, issued_at),
        external_id=external_id,
        external_customer_id=external_customer_id,
        plan_code=plan_code,
        trial_days=trial_days,
        anchor_at=_when("anchor_at", anchor_at),
    )


def cancel_subscription(
    app: Celery | None,
    *,
    external_subscription_id: str | None = None,
    subscription_id: int | None = None,
    at_period_end: bool = False,
    refund_last_charge: bool = False,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.cancel_subscription` for `external_subscription_id` (or our `subscription_id`)."""
    _one_of("external_subscription_id", external_subscription_id, "subscription_id", subscription_id)
    return _command(
        app,
        CANCEL_SUBSCRIPTION,
        (request_id, issued_at),
        external_subscription_id=external_subscription_id,
        subscription_id=subscription_id,
        at_period_end=at_period_end,
        refund_last_charge=refund_last_charge,
    )


def pause_subscription(
    app: Celery | None,
    *,
    external_subscription_id: str,
    resumes_at: When | None = None,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.pause_subscription` (resumes_at None: paused until a resume command)."""
    return _command(
        app,
        PAUSE_SUBSCRIPTION,
        (request_id, issued_at),
        external_subscription_id=external_subscription_id,
        resumes_at=_when("resumes_at", resumes_at),
    )


def resume_subscription(
    app: Celery | None,
    *,
    external_subscription_id: str,
    request_id: str | None = None,
    issued_at: When | None = None,
) -> str:
    """Send `billing.resume_subscription`."""
    return _command(
        app, RESUME_SUBSCRIPTION, (request_id, issued_at), external_subscription_id=external_subscription_id
    )


# Task name -> its helper (a test checks every command has one, taking exactly the task's kwargs).
COMMAND_HELPERS: dict[str, Callable[..., str]] = {
    UPSERT_PLAN: upsert_plan,
    UPSERT_CUSTOMER: upsert_customer,
    ATTACH_CARD: attach_card,
    CREATE_SUBSCRIPTION: create_subscription,
    CANCEL_SUBSCRIPTION: cancel_subscription,
    PAUSE_SUBSCRIPTION: pause_subscription,
    RESUME_SUBSCRIPTION: resume_subscription,
}
