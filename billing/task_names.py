"""The name of every Celery task of the billing worker: the one place both the senders and the worker read them.

The services write task intents to the outbox by these names; `tasks.config` routes them and `tasks.public` /
`tasks.periodic` register them. Pure constants: importing this module touches nothing, so `billing.services`
can use it without depending on Celery or on the `tasks` package.

Public names are a contract: other apps send them by name. Never rename one; add a new name instead.
"""

from __future__ import annotations

from typing import Final

# Public: other apps send these.
CHARGE_INVOICE: Final = "billing.charge_invoice"
REQUEST_REFUND: Final = "billing.request_refund"
ATTACH_CARD: Final = "billing.attach_card"
CANCEL_SUBSCRIPTION: Final = "billing.cancel_subscription"
# Commands by the sender's own ids (docs/tasks.md).
UPSERT_PLAN: Final = "billing.upsert_plan"
UPSERT_CUSTOMER: Final = "billing.upsert_customer"
CREATE_SUBSCRIPTION: Final = "billing.create_subscription"
PAUSE_SUBSCRIPTION: Final = "billing.pause_subscription"
RESUME_SUBSCRIPTION: Final = "billing.resume_subscription"

# Internal: sent by this system (outbox intents, the sweep, beat), stable all the same (messages outlive deploys).
CHARGE_INVOICES: Final = "billing.charge_invoices"  # a batch: what invoice opening and the sweep send
EXECUTE_REFUND: Final = "billing.execute_refund"

# Periodic: beat sends these.
OPEN_DUE_INVOICES: Final = "billing.open_due_invoices"
ENQUEUE_DUE_INVOICES: Final = "billing.enqueue_due_invoices"
RUN_REFUNDS: Final = "billing.run_refunds"
RECONCILE: Final = "billing.reconcile"
RELAY_OUTBOX: Final = "billing.relay_outbox"
DELIVER_EVENTS: Final = "billing.deliver_events"  # on its own queue, billing.events

COMMANDS: Final = (
    UPSERT_PLAN,
    UPSERT_CUSTOMER,
    ATTACH_CARD,
    CREATE_SUBSCRIPTION,
    CANCEL_SUBSCRIPTION,
    PAUSE_SUBSCRIPTION,
    RESUME_SUBSCRIPTION,
)
PUBLIC_TASKS: Final = (
    CHARGE_INVOICE,
    REQUEST_REFUND,
    ATTACH_CARD,
    CANCEL_SUBSCRIPTION,
    UPSERT_PLAN,
    UPSERT_CUSTOMER,
    CREATE_SUBSCRIPTION,
    PAUSE_SUBSCRIPTION,
    RESUME_SUBSCRIPTION,
)
INTERNAL_TASKS: Final = (CHARGE_INVOICES, EXECUTE_REFUND)
PERIODIC_TASKS: Final = (OPEN_DUE_INVOICES, ENQUEUE_DUE_INVOICES, RUN_REFUNDS, RECONCILE, RELAY_OUTBOX, DELIVER_EVENTS)
ALL_TASKS: Final = (*PUBLIC_TASKS, *INTERNAL_TASKS, *PERIODIC_TASKS)
