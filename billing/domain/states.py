"""State names of every stored entity, and which changes between them are allowed."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class SubscriptionStatus(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"


class InvoiceState(StrEnum):
    OPEN = "open"  # waiting for a charge (first try or a dunning retry)
    PAID = "paid"
    REVIEW = "review"  # an attempt's outcome is unknown; no charge until an operator or a lookup resolves it
    UNCOLLECTIBLE = "uncollectible"  # dunning exhausted
    VOID = "void"  # the subscription was canceled before it was paid


class AttemptState(StrEnum):
    PENDING = "pending"  # row committed with its orderId, not yet sent
    SENDING = "sending"  # about to call the gateway / in flight
    APPROVED = "approved"
    DECLINED = "declined"
    UNKNOWN = "unknown"  # may or may not have charged
    NOT_SENT = "not_sent"  # provably never reached the gateway
    # approved by Tpaga while another attempt of the same invoice was already approved: voided automatically
    # inside the void window (a refund row), flagged for an operator past it
    DUPLICATE = "duplicate"


class RefundState(StrEnum):
    REQUESTED = "requested"
    SENDING = "sending"
    VOIDED = "voided"
    REJECTED = "rejected"  # Tpaga answered 406
    EXPIRED = "expired"  # the void window passed before it ran; Tpaga not called
    UNKNOWN = "unknown"  # outcome not known; review


class CardStatus(StrEnum):
    USABLE = "usable"
    UNUSABLE = "unusable"  # hard decline or failed validation: never charge again


TERMINAL_ATTEMPT_STATES = frozenset(
    {AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.NOT_SENT, AttemptState.DUPLICATE}
)

# Every state write goes through these tables (billing.db.cas): a change not listed here is refused.
ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.PENDING: frozenset({AttemptState.SENDING, AttemptState.NOT_SENT}),
    AttemptState.SENDING: frozenset(
        {
            AttemptState.APPROVED,
            AttemptState.DECLINED,
            AttemptState.UNKNOWN,
            AttemptState.NOT_SENT,
            AttemptState.DUPLICATE,
        }
    ),
    # an unknown attempt is resolved by a lookup or an operator
    AttemptState.UNKNOWN: frozenset(
        {AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.NOT_SENT, AttemptState.DUPLICATE}
    ),
    AttemptState.APPROVED: frozenset(),
    AttemptState.DECLINED: frozenset(),
    # Tpaga's late answer for an attempt that reconciliation or an operator had settled as not charged: the
    # answer is the truth (recorded, and flagged; a second approval of the invoice is a duplicate).
    AttemptState.NOT_SENT: frozenset({AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.DUPLICATE}),
    AttemptState.DUPLICATE: frozenset(),
}

INVOICE_TRANSITIONS: dict[InvoiceState, frozenset[InvoiceState]] = {
    InvoiceState.OPEN: frozenset(
        {InvoiceState.PAID, InvoiceState.REVIEW, InvoiceState.UNCOLLECTIBLE, InvoiceState.VOID}
    ),
    InvoiceState.REVIEW: frozenset({InvoiceState.PAID, InvoiceState.OPEN, InvoiceState.UNCOLLECTIBLE}),
    InvoiceState.PAID: frozenset(),
    # a late approval of an invoice dunning had given up on: the customer did pay
    InvoiceState.UNCOLLECTIBLE: frozenset({InvoiceState.PAID}),
    InvoiceState.VOID: frozenset(),
}

SUBSCRIPTION_TRANSITIONS: dict[SubscriptionStatus, frozenset[SubscriptionStatus]] = {
    SubscriptionStatus.TRIALING: frozenset(
        {SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED}
    ),
    SubscriptionStatus.ACTIVE: frozenset(
        {SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED}
    ),
    SubscriptionStatus.PAST_DUE: frozenset(
        {SubscriptionStatus.ACTIVE, SubscriptionStatus.UNPAID, SubscriptionStatus.CANCELED}
    ),
    SubscriptionStatus.UNPAID: frozenset({SubscriptionStatus.CANCELED}),
    SubscriptionStatus.CANCELED: frozenset(),
}

REFUND_TRANSITIONS: dict[RefundState, frozenset[RefundState]] = {
    RefundState.REQUESTED: frozenset({RefundState.SENDING, RefundState.EXPIRED}),
    # back to requested: the void provably never reached Tpaga and is tried again
    RefundState.SENDING: frozenset(
        {RefundState.VOIDED, RefundState.REJECTED, RefundState.REQUESTED, RefundState.UNKNOWN}
    ),
    # a void is idempotent at Tpaga: an unknown one is sent again, or settled by a lookup of the charge
    RefundState.UNKNOWN: frozenset(
        {RefundState.SENDING, RefundState.VOIDED, RefundState.REJECTED, RefundState.EXPIRED}
    ),
    RefundState.VOIDED: frozenset(),
    RefundState.REJECTED: frozenset(),
    RefundState.EXPIRED: frozenset(),
}


S = TypeVar("S", bound=StrEnum)


def can_transition(table: Mapping[S, frozenset[S]], old: S, new: S) -> bool:
    """True when `old -> new` is an allowed change in `table`."""
    return new in table.get(old, frozenset())


def sources(table: Mapping[S, frozenset[S]], new: S) -> tuple[S, ...]:
    """Every state from which `table` allows a change to `new`, in the table's order."""
    return tuple(old for old, targets in table.items() if new in targets)
