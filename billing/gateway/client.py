"""The Tpaga client facade: one typed method per endpoint, each checking its inputs and handing the operation,
path and body to the requestor (`billing.gateway.requestor`), which owns the rate limit, the retry policy,
the deadline and the answer mapping. Safe to share between threads (each thread gets its own HTTP session)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

import requests

from billing.config import DEFAULT_RATE_LIMIT_MAX_WAIT_SECONDS, ConfigError
from billing.gateway.encoding import JsonValue
from billing.gateway.models import Charge, CreditCard, Customer
from billing.gateway.operations import (
    ASSOCIATE_CARD,
    CHARGE,
    CREATE_CUSTOMER,
    GET_CARD,
    GET_CHARGE,
    GET_CUSTOMER,
    REFUND,
    TOKENIZE_CARD,
)
from billing.gateway.ratelimit import RateLimiter
from billing.gateway.requestor import AsyncRequestor, CallPolicy, Requestor
from billing.gateway.retry import DEFAULT_ATTEMPTS, DEFAULT_MAX_SECONDS, RandomSource
from billing.gateway.transport import BasicKeyAuth, Transport

if TYPE_CHECKING:
    from billing.config import Settings

GENDERS = frozenset({"M", "F", "N/A"})
_CURRENCY = re.compile(r"[A-Z]{3}")
_CENT = Decimal("0.01")


def _path_id(name: str, value: object) -> str:
    """An id made safe for a URL path segment. Messages never echo the value: it may be a card id."""
    if not isinstance(value, str) or not value.strip() or value != value.strip() or value in (".", ".."):
        raise ValueError(f"{name} must be a non-empty id without surrounding whitespace")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in value):
        raise ValueError(f"{name} must not contain control characters")
    return quote(value, safe="")


def _money(name: str, value: object, *, allow_zero: bool) -> Decimal:
    """A money amount as an exact Decimal with at most two decimals; floats are refused outright."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise ValueError(f"{name} must be a Decimal or an int (never a float)")
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError(f"{name} must be a finite amount")
    try:
        exact = amount.quantize(_CENT) == amount
    except InvalidOperation:
        exact = False
    if not exact:
        raise ValueError(f"{name} must have at most two decimal places")
    if amount < 0 or (amount == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return amount


def _digits(name: str, value: object, lengths: range) -> str:
    text = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not text.isascii() or not text.isdigit() or len(text) not in lengths:
        raise ValueError(f"{name} must be {lengths.start} to {lengths.stop - 1} digits")
    return text


def charge_payload(
    *,
    card_id: str,
    amount: Decimal,
    currency: str = "COP",
    order_id: str,
    installments: int = 1,
    description: str | None = None,
    tax_amount: Decimal = Decimal(0),
    iac_amount: Decimal = Decimal(0),
) -> dict[str, JsonValue]:
    """The body of a charge, every input checked (ValueError) before anything is sent. `tax_amount` is the
    IVA in the amount (Tpaga's `taxAmount`, always sent), `iac_amount` the consumption tax (INC, `iacAmount`,
    sent only when not zero: Tpaga's default is 0)."""
    _path_id("card_id", card_id)
    _path_id("order_id", order_id)
    value = _money("amount", amount, allow_zero=False)
    tax = _money("tax_amount", tax_amount, allow_zero=True)
    iac = _money("iac_amount", iac_amount, allow_zero=True)
    if tax + iac > value:
        raise ValueError("tax_amount + iac_amount must not exceed amount (prices include their tax)")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise ValueError("currency must be a three-letter upper-case code such as COP")
    if isinstance(installments, bool) or not isinstance(installments, int) or not 1 <= installments <= 36:
        raise ValueError("installments must be an integer from 1 to 36")
    if description is not None and not isinstance(description, str):
        raise ValueError("description must be a string")
    payload: dict[str, JsonValue] = {
        "creditCard": card_id,
        "amount": value,
        "currency": currency,
        "installments": installments,
        "taxAmount": tax,
        "orderId": order_id,
    }
    if iac:
        payload["iacAmount"] = iac
    if description is not None:
        payload["description"] = description
    return payload


class TpagaClient:
    """Typed access to the Tpaga card API. Thread-safe; call close() (or use it as a context manager) when done.

    Outcomes: methods return typed results; failures raise the errors in billing.gateway.errors. A charge
    returns only an approved Charge; a charge whose outcome cannot be known raises OutcomeUnknownError and is
    never sent twice.
    """

    def __init__(
        self,
        api_url: str,
        private_key: str,
        public_key: str | None = None,
        *,
        connect_timeout_seconds: float = 3.05,
        read_timeout_seconds: float = 20.0,
        retry_attempts: int = DEFAULT_ATTEMPTS,
        retry_max_seconds: float = DEFAULT_MAX_SECONDS,
        session_factory: Callable[[], requests.Session] | None = None,
        rng: RandomSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rate_limiter: RateLimiter | None = None,
        rate_limit_max_wait_seconds: float = DEFAULT_RATE_LIMIT_MAX_WAIT_SECONDS,
    ) -> None:
        if not isinstance(private_key, str) or not private_key:
            raise ConfigError("the Tpaga private key (TPAGA_PRIVATE_KEY) is required")
        if public_key is not None and (not isinstance(public_key, str) or not public_key):
            raise ConfigError("the Tpaga public key (TPAGA_PUBLIC_KEY), when given, must be non-empty")
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1 (1 means no retry)")
        if retry_max_seconds < 0:
            raise ValueError("retry_max_seconds must be >= 0")
        if not rate_limit_max_wait_seconds >= 0:
            raise ValueError("rate_limit_max_wait_seconds must be >= 0")
        self._transport = Transport(
            api_url,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
            session_factory=session_factory,
        )
        environment = self._transport.environment
        self._public_auth = BasicKeyAuth(public_key) if public_key else None
        private_auth = BasicKeyAuth(private_key)
        policy = CallPolicy(
            attempts=retry_attempts,
            max_seconds=retry_max_seconds,
            rng=rng or random.Random(),  # jitter, not cryptography
            sleep=sleep,
            rate_limiter=rate_limiter,
            max_wait_seconds=rate_limit_max_wait_seconds,
        )
        self._requestor = Requestor(self._transport, policy, private_auth)
        self._async_requestor = AsyncRequestor(
            self._transport.api_url,
            policy,
            private_auth,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
            environment=environment,
        )
        self._rate_limiter = rate_limiter

    @classmethod
    def from_settings(cls, settings: Settings) -> TpagaClient:
        """A client configured from Settings (URL, keys, timeouts, rate limit)."""
        from billing.gateway import ratelimit

        if not settings.tpaga_private_key:
            raise ConfigError("TPAGA_PRIVATE_KEY is not set")
        return cls(
            settings.tpaga_api_url,
            settings.tpaga_private_key,
            settings.tpaga_public_key,
            connect_timeout_seconds=settings.connect_timeout_seconds,
            read_timeout_seconds=settings.read_timeout_seconds,
            rate_limiter=ratelimit.from_settings(settings),
            rate_limit_max_wait_seconds=settings.rate_limit_max_wait_seconds,
        )

    @property
    def api_url(self) -> str:
        return self._transport.api_url

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The limiter every request passes first (None: no limit)."""
        return self._rate_limiter

    def __repr__(self) -> str:
        return f"TpagaClient(api_url={self.api_url!r})"

    def __enter__(self) -> TpagaClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP sessions of every thread, and the event loops' aiohttp sessions if there are any."""
        self._transport.close()
        self._async_requestor.close()

    async def aclose(self) -> None:
        """Close the running loop's aiohttp session: for a loop that ends before the client does, such as
        `asyncio.run(...)` (a `GatewayPool` closes its loop's sessions itself when it shuts down)."""
        await self._async_requestor.aclose()

    # --- customers -----------------------------------------------------------------------------------------

    def create_customer(
        self,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        email: str | None = None,
        phone: str | None = None,
        gender: str | None = None,
        legal_id_number: str | None = None,
        merchant_customer_id: str | None = None,
    ) -> Customer:
        """POST customer. Not retried once it may have reached Tpaga (a resend could create a duplicate)."""
        if gender is not None and gender not in GENDERS:
            raise ValueError("gender must be one of M, F, N/A")
        fields: dict[str, str | None] = {
            "firstName": first_name,
            "lastName": last_name,
            "email": email,
            "phone": phone,
            "gender": gender,
            "legalIdNumber": legal_id_number,
            "merchantCustomerId": merchant_customer_id,
        }
        for name, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        payload: dict[str, JsonValue] = {k: v for k, v in fields.items() if v is not None}
        return self._requestor.request(CREATE_CUSTOMER, "customer", payload)

    def get_customer(self, customer_id: str) -> Customer:
        """GET customer/{id}."""
        return self._requestor.request(GET_CUSTOMER, f"customer/{_path_id('customer_id', customer_id)}")

    # --- cards ---------------------------------------------------------------------------------------------

    def tokenize_card(
        self,
        *,
        number: str,
        exp_month: int | str,
        exp_year: int | str,
        holder_name: str,
        cvc: str | None = None,
    ) -> str:
        """POST tokenize/credit_card with the PUBLIC key; returns the single-use temporary token.

        In production tokenizing happens in the customer's browser or app; this is for tests, demos and seeding.
        """
        if self._public_auth is None:
            raise ConfigError("tokenize_card needs the Tpaga public key (TPAGA_PUBLIC_KEY)")
        pan = _digits(
            "number", number.replace(" ", "").replace("-", "") if isinstance(number, str) else "", range(12, 20)
        )
        month = int(_digits("exp_month", exp_month, range(1, 3)))
        if not 1 <= month <= 12:
            raise ValueError("exp_month must be 1 to 12")
        year = _digits("exp_year", exp_year, range(4, 5))
        if not isinstance(holder_name, str) or not holder_name.strip():
            raise ValueError("holder_name must be a non-empty string")
        payload: dict[str, JsonValue] = {
            "primaryAccountNumber": pan,
            "expirationMonth": f"{month:02d}",
            "expirationYear": year,
            "cardHolderName": holder_name,
        }
        if cvc is not None:
            payload["cvc"] = _digits("cvc", cvc, range(3, 5))
        return self._requestor.request(TOKENIZE_CARD, "tokenize/credit_card", payload, auth=self._public_auth)

    def associate_card(
        self, customer_id: str, temp_token: str, *, skip_legal_id_check: bool | None = None
    ) -> CreditCard:
        """POST customer/{id}/credit_card_token: turn a temporary token into a permanent card.

        The card is returned even when Tpaga's validation charge failed: see `validation_successful`.
        """
        path = f"customer/{_path_id('customer_id', customer_id)}/credit_card_token"
        _path_id("temp_token", temp_token)
        payload: dict[str, JsonValue] = {"token": temp_token}
        if skip_legal_id_check is not None:
            payload["skipLegalIdCheck"] = bool(skip_legal_id_check)
        return self._requestor.request(ASSOCIATE_CARD, path, payload)

    def get_card(self, customer_id: str, card_id: str) -> CreditCard:
        """GET customer/{id}/credit_card/{card_id}."""
        path = f"customer/{_path_id('customer_id', customer_id)}/credit_card/{_path_id('card_id', card_id)}"
        return self._requestor.request(GET_CARD, path)

    # --- charges -------------------------------------------------------------------------------------------

    def charge(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str = "COP",
        order_id: str,
        installments: int = 1,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge:
        """POST charge/credit_card; returns the charge only when it is approved.

        Raises DeclinedError (402 with a real decline), OutcomeUnknownError (may have charged: never resend
        blindly; look it up by `charge_id` when known, else have an operator check), NotSentError (provably not
        sent, after retrying; DeadlineExceededError when `deadline`, a time.monotonic() value, or the rate
        limiter's longest wait passed first), and the 4xx errors. Inputs are checked before anything is sent
        (ValueError).
        """
        payload = charge_payload(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            installments=installments,
            description=description,
            tax_amount=tax_amount,
            iac_amount=iac_amount,
        )
        return self._requestor.request(CHARGE, "charge/credit_card", payload, deadline=deadline)

    async def charge_async(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str = "COP",
        order_id: str,
        installments: int = 1,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge:
        """`charge` (the same arguments, checks, retry rule, rate limit, deadline and errors) as a coroutine, on
        the running event loop's aiohttp session (`billing.gateway.aio`): what the batch path uses to keep many
        charges in flight on one thread."""
        payload = charge_payload(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            installments=installments,
            description=description,
            tax_amount=tax_amount,
            iac_amount=iac_amount,
        )
        return await self._async_requestor.request(CHARGE, "charge/credit_card", payload, deadline=deadline)

    def get_charge(self, charge_id: str) -> Charge:
        """GET charge/credit_card/{id}: whatever state the charge is in (approved, declined, voided)."""
        return self._requestor.request(GET_CHARGE, f"charge/credit_card/{_path_id('charge_id', charge_id)}")

    def refund(self, charge_id: str) -> Charge:
        """POST refund/credit_card: void a charge; returns the voided charge (202).

        Retried on transport faults (a refund is idempotent at Tpaga). When a retry meets a 406 whose charge is
        already voided, an earlier attempt did the void, so that is success. A 406 on the first attempt raises
        RefundRejectedError (outside the window, declined, or already voided by someone else).
        """
        _path_id("charge_id", charge_id)
        return self._requestor.request(REFUND, "refund/credit_card", {"id": charge_id})
