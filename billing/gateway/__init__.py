"""The Tpaga client: typed results, a typed error hierarchy mirroring HTTP outcomes, and a pure retry rule."""

from billing.gateway.client import TpagaClient
from billing.gateway.errors import (
    DeadlineExceededError,
    DeclinedError,
    FieldError,
    NotFoundError,
    NotSentError,
    OutcomeUnknownError,
    RefundRejectedError,
    TpagaError,
    UnauthorizedError,
    UnexpectedStatusError,
    ValidationError,
    map_response,
)
from billing.gateway.models import Charge, CreditCard, Customer
from billing.gateway.operations import Operation
from billing.gateway.retry import backoff_seconds, should_retry

__all__ = [
    "Charge",
    "CreditCard",
    "Customer",
    "DeadlineExceededError",
    "DeclinedError",
    "FieldError",
    "NotFoundError",
    "NotSentError",
    "Operation",
    "OutcomeUnknownError",
    "RefundRejectedError",
    "TpagaClient",
    "TpagaError",
    "UnauthorizedError",
    "UnexpectedStatusError",
    "ValidationError",
    "backoff_seconds",
    "map_response",
    "should_retry",
]
