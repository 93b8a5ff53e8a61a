"""Helpers for apps that send the billing tasks: the right queue, JSON kwargs, and masked reprs.

Another app does not need this package: any Celery app can `send_task("billing.charge_invoice",
kwargs={"invoice_id": 42}, queue="billing.charges")` (queues in `ROUTES`). What it does need for
`billing.attach_card` is to set `kwargsrepr`, or its own `task-sent` event (when it has
`task_send_sent_event` on) and its own logs would show the token; `send_attach_card` does that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.config import ATTACH_CARD, DEFAULT, KWARGS, ROUTES, SECRET_KWARGS
from tasks.masking import masked_reprs

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["ROUTES", "send", "send_attach_card"]


def send(app: Celery | None, name: str, **kwargs: Any) -> str:
    """Send task `name` with keyword arguments to its queue; returns the task id.

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
    """Send `billing.attach_card` with the token masked in the message's reprs; returns the task id."""
    return send(app, ATTACH_CARD, customer_id=customer_id, token=token)
