"""The charge pipeline's value types: what a claim carries, what a call returned, what charging did."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from billing.domain.money import Money
from billing.domain.states import AttemptState
from billing.gateway import errors as gw
from billing.gateway.models import Charge
from billing.services.pause import PauseReason

IN_FLIGHT = (AttemptState.SENDING, AttemptState.UNKNOWN)
OPEN_ATTEMPT_STATES = (AttemptState.PENDING, AttemptState.SENDING, AttemptState.UNKNOWN)


class Outcome(StrEnum):
    """What charging one invoice did (the `outcome` of a task result); stable strings other apps read."""

    APPROVED = "approved"
    DUPLICATE = "duplicate"  # approved while another attempt of the invoice was: voided automatically
    DECLINED = "declined"
    UNKNOWN = "unknown"  # may have charged: the invoice is in review
    NOT_SENT = "not_sent"  # provably not sent; due again after a short backoff
    REJECTED = "rejected"  # Tpaga refused the request itself; the invoice is in review
    PAUSED = "paused"  # billing is paused; nothing sent
    LOST_CLAIM = "lost_claim"  # reconciliation settled the attempt before it was sent
    UNRECORDED = "unrecorded"  # the answer could not be written; reconciliation flags the attempt
    NOT_FOUND = "not_found"
    ALREADY_PAID = "already_paid"
    IN_REVIEW = "in_review"
    NOT_SCHEDULED = "not_scheduled"
    NOT_DUE = "not_due"
    CLAIMED_ELSEWHERE = "claimed_elsewhere"
    VOID = "void"
    UNCOLLECTIBLE = "uncollectible"
    NO_USABLE_CARD = "no_usable_card"
    SUBSCRIPTION_PAUSED = "subscription_paused"  # the subscription is paused; the invoice waits for its resume


@dataclass(frozen=True)
class ChargeOutcome:
    """What charging one invoice did; small and free of secrets, fit for a task result."""

    invoice_id: int
    outcome: Outcome
    attempt_id: int | None = None
    error_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "invoice_id": self.invoice_id,
            "outcome": str(self.outcome),
            "attempt_id": self.attempt_id,
            "error_code": self.error_code,
        }


@dataclass(frozen=True)
class Claim:
    """A committed attempt, ready to be sent: everything the gateway call needs."""

    invoice_id: int
    attempt_id: int
    order_id: str
    card_tpaga_id: str
    amount: Money
    description: str
    # The invoice's tax line as Tpaga wants it: IVA in taxAmount, INC in iacAmount (zero otherwise).
    tax_amount: Money | None = None
    iac_amount: Money | None = None


class HeldBack(gw.NotSentError):
    """Raised in place of a call the batch decided not to make: provably not sent. `pause` is the reason billing
    was paused by another call of the batch (its invoice is due again as soon as billing resumes), or None
    (retried after the usual not-sent backoff)."""

    def __init__(self, message: str, *, pause: PauseReason | None = None) -> None:
        super().__init__(message, operation="charge")
        self.pause = pause


@dataclass(frozen=True)
class CallResult:
    """What the gateway made of one claimed attempt: the approved charge, or the error the client raised."""

    claim: Claim
    charge: Charge | None = None
    error: BaseException | None = None
