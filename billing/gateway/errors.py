"""The gateway's errors, mirroring what an HTTP exchange with Tpaga can mean, and the one function that maps
a response to its result or error.

No message built here contains a key, a token, a card id or any other id: messages name the operation, the
HTTP status, the reason and the errorCode only. Ids travel as attributes (`charge_id`, `charge`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

from billing.domain.declines import DeclineClass, classify
from billing.gateway.models import Charge, MalformedResponseError, parse_charge
from billing.gateway.operations import Operation

T = TypeVar("T")

UnknownReason = Literal["timeout", "dropped", "server_error", "unknown_code", "malformed", "not_approved"]
UNKNOWN_REASONS: frozenset[str] = frozenset(
    {"timeout", "dropped", "server_error", "unknown_code", "malformed", "not_approved"}
)


def _rebuild(cls: type[TpagaError], args: tuple[Any, ...], state: dict[str, Any]) -> TpagaError:
    error = Exception.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class TpagaError(Exception):
    """Raised when a call to Tpaga does not end in the expected success; the base of every gateway error."""

    def __init__(self, message: str, *, http_status: int | None = None, operation: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.operation = operation

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments would otherwise break pickling (Celery, concurrent.futures).
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class NotSentError(TpagaError):
    """Raised when the request provably never left: connection refused, connect timeout, DNS failure."""

    def __init__(self, message: str, *, operation: str | None = None, cause: str | None = None) -> None:
        super().__init__(message, http_status=None, operation=operation)
        self.cause = cause


class DeadlineExceededError(NotSentError):
    """Raised when a call's deadline (or the rate limiter's longest wait) passed before its request was written:
    nothing was sent, and sending it later would be too late for the caller, so it is not retried."""


class OutcomeUnknownError(TpagaError):
    """Raised when the request may have taken effect at Tpaga but we cannot tell whether it did."""

    def __init__(
        self,
        message: str,
        *,
        reason: UnknownReason,
        http_status: int | None = None,
        operation: str | None = None,
        charge_id: str | None = None,
        cause: str | None = None,
        error_code: str | None = None,
    ) -> None:
        if reason not in UNKNOWN_REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(message, http_status=http_status, operation=operation)
        self.reason: UnknownReason = reason
        self.charge_id = charge_id
        self.cause = cause
        self.error_code = error_code  # Tpaga's code when a 402 carried an unknown-outcome code ("9999", "")


class DeclinedError(TpagaError):
    """Raised when Tpaga answers a charge with 402 and a real decline code."""

    def __init__(self, message: str, *, charge: Charge, operation: str | None = None) -> None:
        super().__init__(message, http_status=402, operation=operation)
        self.charge = charge
        self.error_code = charge.error_code
        self.decline_class: DeclineClass = classify(charge.error_code)


class UnauthorizedError(TpagaError):
    """Raised when Tpaga rejects the API key (401)."""


@dataclass(frozen=True)
class FieldError:
    """One entry of a 422 body; `rejected_value` may be a token, so it stays out of repr and messages."""

    object: str | None
    field: str | None
    message: str | None
    rejected_value: Any = dataclasses.field(default=None, repr=False, compare=False)


class ValidationError(TpagaError):
    """Raised when Tpaga rejects the request's fields (422)."""

    def __init__(
        self,
        message: str,
        *,
        errors: tuple[FieldError, ...] = (),
        http_status: int | None = 422,
        operation: str | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status, operation=operation)
        self.errors = errors


class NotFoundError(TpagaError):
    """Raised when the customer, card or charge does not exist at Tpaga (404)."""


class RefundRejectedError(TpagaError):
    """Raised when Tpaga refuses a refund (406): outside the void window, declined or already voided."""

    def __init__(self, message: str, *, charge: Charge | None, operation: str | None = None) -> None:
        super().__init__(message, http_status=406, operation=operation)
        self.charge = charge


class UnexpectedStatusError(TpagaError):
    """Raised when Tpaga answers with a status this client does not expect for the call."""


# --- mapping -----------------------------------------------------------------------------------------------


def _decode(body: bytes | str) -> Mapping[str, Any] | None:
    """The JSON object in a body, or None when it is not one (HTML, truncated, empty, a list)."""
    try:
        data = json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return data if isinstance(data, dict) else None


def _id_of(data: Mapping[str, Any] | None) -> str | None:
    value = None if data is None else data.get("id")
    return value if isinstance(value, str) and value else None


def _scrub(text: str | None, secret: Any) -> str | None:
    """A server message with the rejected value (which may be a token) cut out."""
    if text is None:
        return None
    if isinstance(secret, str | int) and not isinstance(secret, bool) and len(str(secret)) >= 4:
        text = text.replace(str(secret), "***")
    return text


def _field_errors(data: Mapping[str, Any] | None) -> tuple[FieldError, ...]:
    raw = None if data is None else data.get("errors")
    if not isinstance(raw, list):
        return ()
    errors = []
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        rejected = item.get("rejected-value", item.get("rejectedValue"))

        def text(key: str, item: Mapping[str, Any] = item) -> str | None:
            value = item.get(key)
            return value if isinstance(value, str) else None

        errors.append(FieldError(text("object"), text("field"), _scrub(text("message"), rejected), rejected))
    return tuple(errors)


def _unknown(
    operation: Operation[Any], status: int | None, reason: UnknownReason, detail: str, **kw: Any
) -> OutcomeUnknownError:
    return OutcomeUnknownError(
        f"{operation.name}: outcome unknown ({reason}): {detail}",
        reason=reason,
        http_status=status,
        operation=operation.name,
        **kw,
    )


def error_from_response(operation: Operation[Any], status: int, body: bytes | str) -> TpagaError:
    """The error a response that is not the operation's success status means. 401 bodies are never read."""
    name = operation.name
    if status == 401:
        return UnauthorizedError(f"{name}: Tpaga rejected the API key (HTTP 401)", http_status=401, operation=name)
    if status >= 500:
        return _unknown(operation, status, "server_error", f"HTTP {status}")
    data = _decode(body)
    if operation.money == "charge" and status == 402:
        if data is None:
            return _unknown(operation, status, "malformed", "a 402 whose body is not a JSON object")
        try:
            charge = parse_charge(data)
        except MalformedResponseError as exc:
            return _unknown(operation, status, "malformed", f"a 402 with {exc}", charge_id=_id_of(data))
        decline_class = classify(charge.error_code)
        if charge.paid or decline_class in (DeclineClass.UNKNOWN, DeclineClass.APPROVED):
            code = charge.error_code or "empty"
            return _unknown(
                operation,
                status,
                "unknown_code",
                f"a 402 with errorCode {code}",
                charge_id=charge.id,
                error_code=charge.error_code,
            )
        return DeclinedError(
            f"{name}: declined with errorCode {charge.error_code} ({decline_class.value})",
            charge=charge,
            operation=name,
        )
    if status == 404:
        return NotFoundError(f"{name}: not found at Tpaga (HTTP 404)", http_status=404, operation=name)
    if status == 422:
        errors = _field_errors(data)
        fields = ", ".join(f"{e.field or '?'}: {e.message}" if e.message else (e.field or "?") for e in errors)
        return ValidationError(
            f"{name}: Tpaga rejected the request (HTTP 422)" + (f": {fields}" if fields else ""),
            errors=errors,
            operation=name,
        )
    if operation.money == "refund" and status == 406:
        refused: Charge | None = None
        if data is not None:
            try:
                refused = parse_charge(data)
            except MalformedResponseError:
                refused = None
        state = f" (charge status {refused.status})" if refused is not None else ""
        return RefundRejectedError(
            f"{name}: Tpaga refused the refund (HTTP 406){state}", charge=refused, operation=name
        )
    if operation.money is not None and status < 400:
        # A 2xx or 3xx the API does not define for a charge or refund: it may well have been processed.
        return _unknown(operation, status, "malformed", f"unexpected HTTP {status}", charge_id=_id_of(data))
    return UnexpectedStatusError(f"{name}: unexpected HTTP {status}", http_status=status, operation=name)


def map_response(operation: Operation[T], status: int, body: bytes | str) -> T:
    """The result of a response for this operation, or raise the TpagaError it means.

    The one place that turns (operation, status, body) into an outcome. A charge is returned only when it is
    approved; a refund only when its charge is voided; anything not well-formed is an OutcomeUnknownError.
    """
    if status != operation.success_status:
        raise error_from_response(operation, status, body)
    data = _decode(body)
    if data is None:
        raise _unknown(operation, status, "malformed", "the body is not a JSON object")
    try:
        result = operation.parse(data)
    except MalformedResponseError as exc:
        raise _unknown(operation, status, "malformed", str(exc), charge_id=_id_of(data)) from None
    if isinstance(result, Charge):
        if operation.money == "charge" and not result.approved:
            raise _unknown(
                operation,
                status,
                "not_approved",
                f"HTTP {status} with paid={result.paid}, status {result.status}, errorCode "
                f"{result.error_code or 'empty'}",
                charge_id=result.id,
            )
        if operation.money == "refund" and not result.voided:
            raise _unknown(
                operation, status, "not_approved", f"HTTP {status} with status {result.status}", charge_id=result.id
            )
    return result
