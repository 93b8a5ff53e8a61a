"""Typed results of the Tpaga API, parsed strictly from its JSON (tpaga-api.md section 3).

Money is `Decimal`, never float. Card ids and fingerprints are masked in every repr: with the private key a
card id is enough to charge the card, so it is as secret as a token (design.md invariant 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from billing.domain.declines import normalize_code

APPROVED_STATUS = "authorized"
VOIDED_STATUS = "voided"


class MalformedResponseError(ValueError):
    """Raised when a response body lacks a required field or has one of the wrong type."""


def mask(value: str | None) -> str:
    """At most the last four characters of a secret-ish id, for reprs."""
    if value is None:
        return "None"
    return "'…" + value[-4:] + "'" if len(value) > 4 else "'…'"


@dataclass(frozen=True)
class Customer:
    """A Tpaga customer."""

    id: str
    first_name: str | None
    last_name: str | None
    email: str | None
    phone: str | None
    merchant_customer_id: str | None

    def __repr__(self) -> str:
        # Names, email and phone are personal data: keep them out of logs that print objects.
        return f"Customer(id={self.id!r}, merchant_customer_id={self.merchant_customer_id!r})"


@dataclass(frozen=True)
class CreditCard:
    """A permanent card stored at Tpaga; its `id` is what charges use."""

    id: str
    customer_id: str
    bin: str
    last_four: str
    brand: str
    expiration_month: int
    expiration_year: int
    card_holder_name: str | None
    fingerprint: str | None
    validation_successful: bool | None
    validation_error_code: str | None

    def __repr__(self) -> str:
        return (
            f"CreditCard(id={mask(self.id)}, customer_id={self.customer_id!r}, brand={self.brand!r}, "
            f"last_four={self.last_four!r}, expiration={self.expiration_month:02d}/{self.expiration_year}, "
            f"validation_successful={self.validation_successful!r}, "
            f"validation_error_code={self.validation_error_code!r})"
        )


@dataclass(frozen=True)
class Charge:
    """A CreditCardCharge: approved, declined or voided."""

    id: str
    amount: Decimal
    currency: str
    card_id: str | None
    customer_id: str | None
    order_id: str | None
    paid: bool
    status: str
    authorization_code: str | None
    error_code: str
    error_message: str | None
    installments: int
    net_amount: Decimal | None
    tpaga_fee_amount: Decimal | None
    date_created: datetime | None
    # The rest of Tpaga's settlement breakdown, as returned (None when the answer did not carry it).
    tax_amount: Decimal | None = None
    iac_amount: Decimal | None = None
    rete_renta_amount: Decimal | None = None
    rete_ica_amount: Decimal | None = None
    rete_iva_amount: Decimal | None = None
    payment_transaction: str | None = None

    @property
    def approved(self) -> bool:
        return self.paid and self.status == APPROVED_STATUS and self.error_code == "00"

    @property
    def voided(self) -> bool:
        return self.status == VOIDED_STATUS

    def __repr__(self) -> str:
        return (
            f"Charge(id={self.id!r}, amount={self.amount!r}, currency={self.currency!r}, "
            f"card_id={mask(self.card_id)}, order_id={self.order_id!r}, paid={self.paid!r}, "
            f"status={self.status!r}, error_code={self.error_code!r})"
        )


# --- parsing ---------------------------------------------------------------------------------------------


def _require(data: Mapping[str, Any], key: str) -> Any:
    if key not in data or data[key] is None:
        raise MalformedResponseError(f"missing field {key!r}")
    return data[key]


def _str(data: Mapping[str, Any], key: str) -> str:
    value = _require(data, key)
    if not isinstance(value, str) or not value:
        raise MalformedResponseError(f"field {key!r} is not a non-empty string")
    return value


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedResponseError(f"field {key!r} is not a string")
    return str(value)


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise MalformedResponseError(f"field {key!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    raise MalformedResponseError(f"field {key!r} is not an integer")


def parse_money(value: Any, key: str = "amount") -> Decimal:
    """A money field ("4500.00", 4500 or an exact JSON decimal) as a finite Decimal; floats are refused."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise MalformedResponseError(f"field {key!r} is not a decimal amount")
    try:
        amount = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise MalformedResponseError(f"field {key!r} is not a decimal amount") from None
    if not amount.is_finite():
        raise MalformedResponseError(f"field {key!r} is not a finite amount")
    return amount


def _opt_money(data: Mapping[str, Any], key: str) -> Decimal | None:
    value = data.get(key)
    return None if value is None else parse_money(value, key)


def _opt_datetime(data: Mapping[str, Any], key: str) -> datetime | None:
    value = data.get(key)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        # A date we cannot read never changes what a charge means; it is informational only.
        return None


def _object(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = _require(data, key)
    if not isinstance(value, Mapping):
        raise MalformedResponseError(f"field {key!r} is not an object")
    return value


def parse_customer(data: Mapping[str, Any]) -> Customer:
    """A Customer from its JSON object."""
    return Customer(
        id=_str(data, "id"),
        first_name=_opt_str(data, "firstName"),
        last_name=_opt_str(data, "lastName"),
        email=_opt_str(data, "email"),
        phone=_opt_str(data, "phone"),
        merchant_customer_id=_opt_str(data, "merchantCustomerId"),
    )


def parse_credit_card(data: Mapping[str, Any]) -> CreditCard:
    """A CreditCard from its JSON object (expiration month and year may be strings like "03")."""
    validation = data.get("validationCharge")
    successful: bool | None = None
    validation_code: str | None = None
    if validation is not None:
        if not isinstance(validation, Mapping):
            raise MalformedResponseError("field 'validationCharge' is not an object")
        raw_successful = validation.get("successful")
        if raw_successful is not None and not isinstance(raw_successful, bool):
            raise MalformedResponseError("field 'validationCharge.successful' is not a boolean")
        successful = raw_successful
        raw_code = validation.get("errorCode")
        validation_code = None if raw_code is None else normalize_code(raw_code)
    return CreditCard(
        id=_str(data, "id"),
        customer_id=_str(data, "customer"),
        bin=_str(data, "bin"),
        last_four=_str(data, "lastFour"),
        brand=_str(data, "type"),
        expiration_month=_int(_require(data, "expirationMonth"), "expirationMonth"),
        expiration_year=_int(_require(data, "expirationYear"), "expirationYear"),
        card_holder_name=_opt_str(data, "cardHolderName"),
        fingerprint=_opt_str(data, "fingerprint"),
        validation_successful=successful,
        validation_error_code=validation_code,
    )


def parse_charge(data: Mapping[str, Any]) -> Charge:
    """A Charge from a CreditCardCharge JSON object; errorCode is normalized ("5" becomes "05")."""
    paid = _require(data, "paid")
    if not isinstance(paid, bool):
        raise MalformedResponseError("field 'paid' is not a boolean")
    info = _object(data, "transactionInfo")
    installments = data.get("installments")
    return Charge(
        id=_str(data, "id"),
        amount=parse_money(_require(data, "amount")),
        currency=_str(data, "currency"),
        card_id=_opt_str(data, "creditCard"),
        customer_id=_opt_str(data, "customer"),
        order_id=_opt_str(data, "orderId"),
        paid=paid,
        status=_str(info, "status"),
        authorization_code=_opt_str(info, "authorizationCode"),
        error_code=normalize_code(data.get("errorCode")),
        error_message=_opt_str(data, "errorMessage"),
        installments=1 if installments is None else _int(installments, "installments"),
        net_amount=_opt_money(data, "netAmount"),
        tpaga_fee_amount=_opt_money(data, "tpagaFeeAmount"),
        date_created=_opt_datetime(data, "dateCreated"),
        tax_amount=_opt_money(data, "taxAmount"),
        iac_amount=_opt_money(data, "iacAmount"),
        rete_renta_amount=_opt_money(data, "reteRentaAmount"),
        rete_ica_amount=_opt_money(data, "reteIcaAmount"),
        rete_iva_amount=_opt_money(data, "reteIvaAmount"),
        payment_transaction=_opt_str(data, "paymentTransaction"),
    )


def parse_token(data: Mapping[str, Any]) -> str:
    """The temporary card token of a tokenize answer."""
    return _str(data, "token")
