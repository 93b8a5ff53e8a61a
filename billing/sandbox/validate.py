"""Request bodies in, typed requests out, or ValidationFailed with Tpaga's 422 entries (tpaga-api.md section 2).

JSON is parsed with `parse_float=Decimal`, so numbers arrive here as int or Decimal and never pass through float.

Two modes. Lenient (the default, like Tpaga): Tpaga's 422 body is the Grails framework's validation-error format,
and Grails' data binding converts what it can, so a numeric string binds to a number field ("01" -> 1), a
number to a string field (123 -> "123"), an empty string to "absent", and only what cannot be converted is a
422; `installments` defaults to 1. Strict (`strict=True`): exactly the documented types, so that a client that
passes strict mode does not depend on any of that conversion (docs/sandbox.md, "Known from Tpaga's clients").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.sandbox.cards import luhn_ok, mask
from billing.sandbox.errors import FieldError, ValidationFailed

CUSTOMER = "Customer"
CARD = "CreditCard"
TOKEN = "CreditCardToken"
CHARGE = "CreditCardCharge"
REFUND = "CreditCardRefund"

MAX_AMOUNT = Decimal("1000000000000")  # far above any real COP charge; keeps arithmetic and output sane
# Tpaga's bodies are two levels deep at most; a limit well under Python's recursion limit keeps the answer a 422
# whatever the stack depth of the handler that parses it.
MAX_DEPTH = 32
CENT = Decimal("0.01")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_GENDERS = frozenset({"M", "F", "N/A"})
# A plain decimal as a form sends it; exponents ("1e5") and words ("NaN") are not bound to a number.
_NUMERIC_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_BOOLEAN_TEXT = {"true": True, "false": False}
_MAX_NUMERIC_TEXT = 40
DEFAULT_INSTALLMENTS = 1
MAX_INSTALLMENTS = 36


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, charset: str | None, obj: str, *, holds_card_number: bool = False) -> dict[str, Any]:
    """The body as a JSON object; anything else is a 422 on the body itself."""
    # A malformed tokenize (or legacy card) body may hold a card number: never echo it back.
    echo = obj != TOKEN and not holds_card_number
    try:
        body = load_json(raw, charset, parse_float=Decimal)
    except ValueError as exc:
        shown_body = raw[:80].decode("utf-8", "replace") if echo else None
        raise ValidationFailed.one(obj, "body", shown_body, f"the body must be JSON: {exc}") from None
    except UnsafeJson as exc:
        raise ValidationFailed.one(obj, "body", None, str(exc)) from None
    if not isinstance(body, dict):
        raise ValidationFailed.one(obj, "body", body if echo else None, "the body must be a JSON object")
    return body


class UnsafeJson(Exception):
    """Raised when a body is JSON but cannot be answered safely: nested too deep, or not Unicode text."""


def load_json(raw: bytes, charset: str | None, *, parse_float: Callable[[str], Any] = float) -> Any:
    """Decodes and parses a body: ValueError when it is not JSON text, UnsafeJson when it cannot be echoed back."""
    try:
        text = raw.decode(charset or "utf-8")
    except LookupError as exc:  # an unknown charset, or a codec that is not a text encoding
        raise ValueError(str(exc)) from None
    try:
        value = json.loads(text, parse_float=parse_float, parse_constant=_no_constants)
    except RecursionError:
        raise UnsafeJson(f"the body must not nest deeper than {MAX_DEPTH} levels") from None
    _check_tree(value)
    return value


def _check_tree(value: object) -> None:
    """Refuses nesting deeper than MAX_DEPTH and any string (key or value) that is not Unicode text."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise UnsafeJson(f"the body must not nest deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    # A \\ud800 escape parses to a lone surrogate, which no answer that echoes or stores it can encode as UTF-8.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise UnsafeJson(f"the body must be Unicode text: it holds a lone surrogate \\u{code:04x}") from None


class _Fields:
    """Collects every field error of one body so a client sees them all at once."""

    def __init__(self, obj: str, body: dict[str, Any], strict: bool) -> None:
        self.obj = obj
        self.body = body
        self.strict = strict
        self.errors: list[FieldError] = []

    def fail(self, field: str, value: object, message: str) -> None:
        self.errors.append(FieldError(self.obj, field, value, message))

    def check(self) -> None:
        if self.errors:
            raise ValidationFailed(*self.errors)

    def as_text(self, value: object) -> object:
        """A scalar JSON number (or true/false) as the string Grails binds it to; strict mode converts nothing."""
        if self.strict or isinstance(value, str) or value is None:
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | Decimal):
            return str(value)
        return value  # an object or a list: nothing to bind to a string

    def as_number(self, value: object) -> object:
        """A numeric string as the number Grails binds it to ("" is absent); strict mode converts nothing."""
        if self.strict or not isinstance(value, str):
            return value
        text = value.strip()
        if not text:
            return None
        # The length cap keeps int() under Python's digit limit; anything that long is "too large" anyway.
        if len(text) <= _MAX_NUMERIC_TEXT and _NUMERIC_TEXT.match(text):
            return int(text) if text.lstrip("+-").isdigit() else Decimal(text)
        return value

    def optional_str(self, field: str) -> str | None:
        return self.nested_str(field, self.body.get(field))

    def nested_str(self, field: str, raw: object) -> str | None:
        value = self.as_text(raw)
        if value is None or isinstance(value, str):
            return value
        self.fail(field, raw, "must be a string")
        return None

    def required_str(self, field: str) -> str:
        raw = self.body.get(field)
        value = self.as_text(raw)
        if isinstance(value, str) and value.strip():
            return value
        self.fail(field, raw, "is required" if value in (None, "") else "must be a string")
        return ""

    def money(self, field: str, *, required: bool) -> Decimal:
        raw = self.body.get(field)
        value = self.as_number(raw)
        if value is None:
            if required:
                self.fail(field, raw, "is required")
            return Decimal(0)
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            self.fail(field, raw, "must be a JSON number" if self.strict else "must be a number")
            return Decimal(0)
        amount = Decimal(value)
        if isinstance(raw, str) and isinstance(value, Decimal) and int(value.as_tuple().exponent) < -2:
            # "4.500" from a Colombian form means 4,500 pesos, not 4.50: a string never loses digits silently.
            self.fail(field, raw, "must have at most two decimals (no thousands separators)")
            return Decimal(0)
        # Checked in this order so that only a sane amount is ever quantized: Decimal's default context has 28
        # digits, and quantizing 1e26 (or -1e308) to cents would raise InvalidOperation.
        if required and amount <= 0:
            self.fail(field, raw, "must be greater than 0")
        elif amount < 0:
            self.fail(field, raw, "must not be negative")
        elif amount >= MAX_AMOUNT:
            self.fail(field, raw, "is too large")
        elif amount != amount.quantize(CENT):
            self.fail(field, raw, "must have at most two decimals")
        else:
            return amount.quantize(CENT)
        return Decimal(0)


@dataclass(frozen=True, slots=True)
class CustomerRequest:
    fields: dict[str, object]


_CUSTOMER_STRINGS = ("firstName", "lastName", "email", "gender", "phone", "legalIdNumber", "merchantCustomerId")


def customer_request(body: dict[str, Any], *, strict: bool = False) -> CustomerRequest:
    f = _Fields(CUSTOMER, body, strict)
    fields: dict[str, object] = {name: f.optional_str(name) for name in _CUSTOMER_STRINGS}
    email = fields["email"]
    if isinstance(email, str) and not _EMAIL.match(email):
        f.fail("email", email, "must be a valid email address")
    gender = fields["gender"]
    if isinstance(gender, str) and gender not in _GENDERS:
        f.fail("gender", gender, "must be one of M, F, N/A")
    fields["address"] = _address(f, body.get("address"))
    f.check()
    return CustomerRequest(fields)


def _address(f: _Fields, value: object) -> dict[str, object] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        f.fail("address", value, "must be an object")
        return None
    out: dict[str, object] = {}
    for name in ("addressLine1", "addressLine2", "postalCode"):
        out[name] = f.nested_str(f"address.{name}", value.get(name))
    city = value.get("city")
    if city is None:
        out["city"] = None
    elif isinstance(city, dict):
        out["city"] = {n: f.nested_str(f"address.city.{n}", city.get(n)) for n in ("name", "state", "country")}
    else:
        f.fail("address.city", city, "must be an object")
        out["city"] = None
    return out


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    number: str
    expiration_month: int
    expiration_year: int
    holder_name: str
    extra: dict[str, str | None]


_CARD_EXTRA = (
    "cardHolderLegalIdNumber",
    "cardHolderLegalIdType",
    "addressLine1",
    "addressLine2",
    "addressCity",
    "addressState",
    "addressPostalCode",
    "addressCountry",
)


def tokenize_request(body: dict[str, Any], *, strict: bool = False, obj: str = TOKEN) -> TokenizeRequest:
    """Shape checks only; the expiry against the clock is the state's job. `obj` names the 422's resource."""
    f = _Fields(obj, body, strict)
    raw_number = body.get("primaryAccountNumber")
    if isinstance(raw_number, int) and not isinstance(raw_number, bool) and not strict:
        raw_number = str(raw_number)
    number = ""
    if not isinstance(raw_number, str) or not raw_number.strip():
        message = "is required" if raw_number in (None, "") else "must be a string of digits"
        f.fail("primaryAccountNumber", _masked(raw_number), message)
    else:
        # Card forms (jQuery.payment) group digits with spaces; the digits are what count.
        number = raw_number.replace(" ", "").replace("-", "")
        if not number.isdigit() or not 12 <= len(number) <= 19:
            f.fail("primaryAccountNumber", mask(number), "must be 12 to 19 digits")
        elif not luhn_ok(number):
            f.fail("primaryAccountNumber", mask(number), "is not a valid card number (Luhn check)")
    month = _small_int(f, "expirationMonth", body.get("expirationMonth"), 1, 12, digits=(1, 2))
    year = _small_int(f, "expirationYear", body.get("expirationYear"), 1000, 9999, digits=(4, 4))
    holder = f.required_str("cardHolderName")
    cvc = body.get("cvc")
    if cvc is not None:
        text = str(cvc) if isinstance(cvc, int) and not isinstance(cvc, bool) else cvc
        if not isinstance(text, str) or not text.isdigit() or not 3 <= len(text) <= 4:
            f.fail("cvc", "***", "must be 3 or 4 digits")
    extra = {name: f.optional_str(name) for name in _CARD_EXTRA}
    f.check()
    return TokenizeRequest(number, month, year, holder, extra)


# Tpaga's Ruby README builds the legacy card from `cardVerificationCode` and a nested `billingAddress`; the card it
# answers with is the same CreditCard object, whose address fields are flat.
_BILLING_ADDRESS = {
    "addressLine1": "addressLine1",
    "addressLine2": "addressLine2",
    "city": "addressCity",
    "state": "addressState",
    "postalCode": "addressPostalCode",
    "country": "addressCountry",
}


def legacy_card_request(body: dict[str, Any], *, strict: bool = False) -> TokenizeRequest:
    """The body of the legacy `POST customer/{id}/credit_card`: a tokenize body, under Tpaga's older names too."""
    flat = dict(body)
    if "cvc" not in flat and "cardVerificationCode" in flat:
        flat["cvc"] = flat.pop("cardVerificationCode")
    address = flat.pop("billingAddress", None)
    if address is not None and not isinstance(address, dict):
        raise ValidationFailed.one(CARD, "billingAddress", address, "must be an object")
    for name, flat_name in _BILLING_ADDRESS.items():
        if address and name in address and flat_name not in flat:
            flat[flat_name] = address[name]
    return tokenize_request(flat, strict=strict, obj=CARD)


def _masked(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return mask(value) if isinstance(value, str) else value


def _small_int(f: _Fields, field: str, value: object, low: int, high: int, digits: tuple[int, int]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        f.fail(field, value, "is required" if value is None else "must be a string of digits")
        return 0
    if not text.isdigit() or not digits[0] <= len(text) <= digits[1] or not low <= int(text) <= high:
        f.fail(field, value, f"must be a number from {low} to {high}")
        return 0
    return int(text)


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    token: str
    skip_legal_id_check: bool


def associate_request(body: dict[str, Any], *, strict: bool = False) -> AssociateRequest:
    f = _Fields(CARD, body, strict)
    token = f.required_str("token")
    skip = body.get("skipLegalIdCheck", False)
    if not strict and isinstance(skip, str):
        skip = _BOOLEAN_TEXT.get(skip.strip().lower(), skip)  # Grails binds "true"/"false" to a Boolean
    if not isinstance(skip, bool):
        f.fail("skipLegalIdCheck", skip, "must be true or false")
        skip = False
    f.check()
    return AssociateRequest(token, skip)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    credit_card: str
    amount: Decimal
    tax_amount: Decimal
    iac_amount: Decimal
    tip_amount: Decimal
    currency: str
    installments: int
    order_id: str | None
    description: str | None
    third_party_id: str | None
    child_merchant_id: str | None


def charge_request(body: dict[str, Any], *, strict: bool = False) -> ChargeRequest:
    """Shape checks only; whether the card exists is the state's job."""
    f = _Fields(CHARGE, body, strict)
    credit_card = f.required_str("creditCard")
    amount = f.money("amount", required=True)
    tax = f.money("taxAmount", required=False)
    iac = f.money("iacAmount", required=False)
    tip = f.money("tipAmount", required=False)
    currency = body.get("currency")
    if currency != "COP":
        f.fail("currency", currency, "is required" if currency is None else "must be COP")
    raw_installments = body.get("installments")
    installments = f.as_number(raw_installments)
    if (
        not strict
        and isinstance(installments, Decimal)
        # Checked first, and without the context (abs() of 1e1000000000 overflows): int() of 1e308 has 309 digits.
        and installments.copy_abs() <= MAX_INSTALLMENTS
        and installments == installments.to_integral_value()
    ):
        installments = int(installments)  # "1.0" or 1.0 binds to the Integer 1
    if installments is None:
        if strict:
            f.fail("installments", raw_installments, "is required")
        # Tpaga's own example omitted it for most of a year and its charges went through as one installment.
        installments = 0 if strict else DEFAULT_INSTALLMENTS
    elif (
        not isinstance(installments, int) or isinstance(installments, bool) or not 1 <= installments <= MAX_INSTALLMENTS
    ):
        f.fail("installments", raw_installments, "must be a whole number from 1 to 36")
        installments = 0
    request = ChargeRequest(
        credit_card=credit_card,
        amount=amount,
        tax_amount=tax,
        iac_amount=iac,
        tip_amount=tip,
        currency="COP",
        installments=installments,
        order_id=f.optional_str("orderId"),
        description=f.optional_str("description"),
        third_party_id=f.optional_str("thirdPartyId"),
        child_merchant_id=f.optional_str("childMerchantId"),
    )
    f.check()
    return request


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def refund_request(body: dict[str, Any], *, strict: bool = False) -> str:
    f = _Fields(REFUND, body, strict)
    charge_id = f.required_str("id")
    f.check()
    return charge_id
