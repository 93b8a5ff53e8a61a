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


TERMINAL_ATTEMPT_STATES = frozenset({AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.NOT_SENT})

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.PENDING: frozenset({AttemptState.SENDING, AttemptState.NOT_SENT}),
    AttemptState.SENDING: frozenset(
        {AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.UNKNOWN, AttemptState.NOT_SENT}
    ),
    # an unknown attempt is resolved by a lookup or an operator
    AttemptState.UNKNOWN: frozenset({AttemptState.APPROVED, AttemptState.DECLINED, AttemptState.NOT_SENT}),
    AttemptState.APPROVED: frozenset(),
    AttemptState.DECLINED: frozenset(),
    AttemptState.NOT_SENT: frozenset(),
}

INVOICE_TRANSITIONS: dict[InvoiceState, frozenset[InvoiceState]] = {
    InvoiceState.OPEN: frozenset(
        {InvoiceState.PAID, InvoiceState.REVIEW, InvoiceState.UNCOLLECTIBLE, InvoiceState.VOID}
    ),
    InvoiceState.REVIEW: frozenset({InvoiceState.PAID, InvoiceState.OPEN, InvoiceState.UNCOLLECTIBLE}),
    InvoiceState.PAID: frozenset(),
    InvoiceState.UNCOLLECTIBLE: frozenset(),
    InvoiceState.VOID: frozenset(),
}


S = TypeVar("S", bound=StrEnum)


def can_transition(table: Mapping[S, frozenset[S]], old: S, new: S) -> bool:
    """True when `old -> new` is an allowed change in `table`."""
    return new in table.get(old, frozenset())
