"""The Tpaga client facade: one typed method per endpoint on top of the transport, the response mapping and
the retry policy. Safe to share between threads (each thread gets its own HTTP session)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import requests
from requests.cookies import extract_cookies_to_jar
from requests.structures import CaseInsensitiveDict

from billing.config import ConfigError
from billing.gateway.aio import AsyncTransport
from billing.gateway.encoding import JsonValue, encode_json
from billing.gateway.errors import RefundRejectedError, map_response
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
    Operation,
)
from billing.gateway.ratelimit import RateLimiter, acquire_async
from billing.gateway.retry import RandomSource, build_async_retrying, build_retrying, end_call
from billing.gateway.transport import BasicKeyAuth, Transport, default_session

if TYPE_CHECKING:
    from tenacity import Retrying

    from billing.config import Settings

T = TypeVar("T")

logger = logging.getLogger("billing.gateway")

# Threads for the rate limiter's Redis round trips on the async path (each takes ~0.1 ms: 4 serve ~40,000/s).
BLOCKING_THREADS = 4
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


class _DirectSession(requests.Session):
    """A Session whose `request` goes straight from a PreparedRequest to the adapter when called the way the
    transport calls it (data bytes, headers, auth, timeout, no redirects, no streaming), skipping the generic
    machinery around it that a worker pays for on every charge (about a fifth of the client's CPU time):
    building a Request, merging settings, dispatching hooks. What that machinery does is kept: the session's
    headers under the call's own, the session's auth, proxies, verify and cert settings, the adapter (urllib3
    pool, max_retries=0) with its exceptions, the body read in full, and cookies (sent when the session holds
    some, stored when an answer sets some). Any other call takes requests' full path.
    """

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: Any = None,
        timeout: Any = None,
        allow_redirects: bool = True,
        **others: Any,
    ) -> requests.Response:
        if allow_redirects or any(value is not None for value in others.values()):
            return super().request(
                method,
                url,
                data=data,
                headers=headers,
                auth=auth,
                timeout=timeout,
                allow_redirects=allow_redirects,
                **others,
            )
        merged = CaseInsensitiveDict(self.headers)
        merged.update(headers or {})
        prepared = requests.PreparedRequest()
        prepared.prepare(
            method=method.upper(),
            url=url,
            headers=merged,
            data=data,
            auth=auth or self.auth,
            cookies=self.cookies if len(self.cookies) else None,
        )
        response = self.get_adapter(url).send(
            prepared,
            stream=False,
            timeout=timeout,
            verify=True if self.verify is None else self.verify,
            cert=self.cert,
            proxies=self.proxies,
        )
        if "set-cookie" in response.headers:
            extract_cookies_to_jar(self.cookies, prepared, response.raw)  # type: ignore[no-untyped-call]
        _ = response.content  # read in full before returning, as Session.send does unless streaming
        return response


def _environment_snapshot_session(api_url: str) -> Callable[[], requests.Session]:
    """Sessions that read the proxy and CA-bundle variables once, when created, instead of on every request.

    With `trust_env` on, requests scans the whole environment for proxy settings on each request (about half
    of a charge's client CPU time on a busy worker). The snapshot keeps what those variables mean here
    (`HTTPS_PROXY`/`NO_PROXY`, `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE`); the keys are sent as explicit auth, so
    `.netrc`, the other thing `trust_env` reads, never applied. The sessions are `_DirectSession`s with the
    transport's default adapters.
    """

    def factory() -> requests.Session:
        session = _DirectSession()
        for prefix, adapter in default_session().adapters.items():
            session.mount(prefix, adapter)
        session.proxies.update(requests.utils.get_environ_proxies(api_url))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle and api_url.startswith("https:"):  # (a path makes requests stat it on every request)
            session.verify = bundle
        session.trust_env = False
        return session

    return factory


def charge_payload(
    *,
    card_id: str,
    amount: Decimal,
    currency: str = "COP",
    order_id: str,
    installments: int = 1,
    description: str | None = None,
    tax_amount: Decimal = Decimal(0),
) -> dict[str, JsonValue]:
    """The body of a charge, every input checked (ValueError) before anything is sent."""
    _path_id("card_id", card_id)
    _path_id("order_id", order_id)
    value = _money("amount", amount, allow_zero=False)
    tax = _money("tax_amount", tax_amount, allow_zero=True)
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
    if description is not None:
        payload["description"] = description
    return payload


def _close_on_loop(loop: asyncio.AbstractEventLoop, transport: AsyncTransport) -> None:
    """Close an aiohttp transport on its own loop, from any thread. A loop that is no longer running cannot
    close it any more: its sockets are closed when collected (use `aclose()` inside such a loop before it
    ends)."""
    if loop.is_closed() or not loop.is_running():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(transport.close())
        return
    future = asyncio.run_coroutine_threadsafe(transport.close(), loop)
    try:
        future.result(timeout=5)
    except Exception as exc:  # closing is best effort
        logger.debug("closing the aiohttp session failed: %s", type(exc).__name__)


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
        retry_attempts: int = 3,
        retry_max_seconds: float = 10.0,
        session_factory: Callable[[], requests.Session] | None = None,
        rng: RandomSource | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if not isinstance(private_key, str) or not private_key:
            raise ConfigError("the Tpaga private key (TPAGA_PRIVATE_KEY) is required")
        if public_key is not None and (not isinstance(public_key, str) or not public_key):
            raise ConfigError("the Tpaga public key (TPAGA_PUBLIC_KEY), when given, must be non-empty")
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1 (1 means no retry)")
        if retry_max_seconds < 0:
            raise ValueError("retry_max_seconds must be >= 0")
        self._transport = Transport(
            api_url,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
            session_factory=session_factory or _environment_snapshot_session(api_url),
        )
        self._private_auth = BasicKeyAuth(private_key)
        self._public_auth = BasicKeyAuth(public_key) if public_key else None
        self._retry_attempts = retry_attempts
        self._retry_max_seconds = retry_max_seconds
        self._rng: RandomSource = rng or random.Random()  # jitter, not cryptography
        self._sleep = sleep
        self._rate_limiter = rate_limiter
        self._aio: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncTransport] = weakref.WeakKeyDictionary()
        self._aio_lock = threading.Lock()
        self._blocking: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TpagaClient:
        """A client configured from Settings (URL, keys, timeouts)."""
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
        )

    @property
    def api_url(self) -> str:
        return self._transport.api_url

    def __repr__(self) -> str:
        return f"TpagaClient(api_url={self.api_url!r})"

    def __enter__(self) -> TpagaClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP sessions of every thread, and the event loop's aiohttp session if there is one."""
        self._transport.close()
        with self._aio_lock:
            transports = list(self._aio.items())
            self._aio = weakref.WeakKeyDictionary()
            blocking, self._blocking = self._blocking, None
        for loop, transport in transports:
            _close_on_loop(loop, transport)
        if blocking is not None:
            blocking.shutdown(wait=False)

    # --- plumbing ------------------------------------------------------------------------------------------

    def _retrying(self, operation: Operation[T]) -> Retrying:
        return build_retrying(
            operation,
            attempts=self._retry_attempts,
            max_seconds=self._retry_max_seconds,
            rng=self._rng,
            sleep=self._sleep,
        )

    def _call(
        self,
        operation: Operation[T],
        path: str,
        payload: dict[str, JsonValue] | None = None,
        *,
        auth: BasicKeyAuth | None = None,
    ) -> T:
        body = None if payload is None else encode_json(payload)
        for attempt in self._retrying(operation):
            with attempt:
                if self._rate_limiter is not None:
                    self._rate_limiter.acquire()
                raw = self._transport.send(operation, path, auth=auth or self._private_auth, body=body)
                return map_response(operation, raw.status, raw.payload)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

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
        return self._call(CREATE_CUSTOMER, "customer", payload)

    def get_customer(self, customer_id: str) -> Customer:
        """GET customer/{id}."""
        return self._call(GET_CUSTOMER, f"customer/{_path_id('customer_id', customer_id)}")

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
        return self._call(TOKENIZE_CARD, "tokenize/credit_card", payload, auth=self._public_auth)

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
        return self._call(ASSOCIATE_CARD, path, payload)

    def get_card(self, customer_id: str, card_id: str) -> CreditCard:
        """GET customer/{id}/credit_card/{card_id}."""
        path = f"customer/{_path_id('customer_id', customer_id)}/credit_card/{_path_id('card_id', card_id)}"
        return self._call(GET_CARD, path)

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
    ) -> Charge:
        """POST charge/credit_card; returns the charge only when it is approved.

        Raises DeclinedError (402 with a real decline), OutcomeUnknownError (may have charged: never resend
        blindly; look it up by `charge_id` when known, else have an operator check), NotSentError (provably not
        sent, after retrying), and the 4xx errors. Inputs are checked before anything is sent (ValueError).
        """
        payload = charge_payload(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            installments=installments,
            description=description,
            tax_amount=tax_amount,
        )
        return self._call(CHARGE, "charge/credit_card", payload)

    async def charge_async(self, **fields: Any) -> Charge:
        """`charge` (the same keyword arguments, checks, retry rule, rate limit and errors) as a coroutine, on
        the running event loop's aiohttp session (`billing.gateway.aio`): what the batch path uses to keep
        many charges in flight on one thread."""
        payload = charge_payload(**fields)
        body = encode_json(payload)
        transport = self._async_transport()
        retrying = build_async_retrying(
            CHARGE, attempts=self._retry_attempts, max_seconds=self._retry_max_seconds, rng=self._rng
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self._rate_limiter is not None:
                        await acquire_async(self._rate_limiter, self._run_blocking)
                    raw = await transport.send(CHARGE, "charge/credit_card", auth=self._private_auth, body=body)
                    return map_response(CHARGE, raw.status, raw.payload)
        finally:
            end_call(retrying)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def _run_blocking(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """A short blocking call (the rate limiter's Redis round trip) off the event loop, on a few threads of
        the client's own: however many charges are in flight, they queue there instead of starting a thread
        each."""
        with self._aio_lock:
            if self._blocking is None:
                self._blocking = ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="tpaga-rate")
            executor = self._blocking
        return asyncio.get_running_loop().run_in_executor(executor, fn)

    def _async_transport(self) -> AsyncTransport:
        """The aiohttp transport of the running event loop: one per loop, so a client used from two loops
        (two GatewayPools, or `asyncio.run` in two threads) never closes one loop's calls under another's."""
        loop = asyncio.get_running_loop()
        with self._aio_lock:
            transport = self._aio.get(loop)
            if transport is None:
                transport = AsyncTransport(
                    self.api_url,
                    connect_timeout_seconds=self._transport.connect_timeout_seconds,
                    read_timeout_seconds=self._transport.read_timeout_seconds,
                )
                self._aio[loop] = transport
        return transport

    async def aclose(self) -> None:
        """Close the running loop's aiohttp session: for a loop that ends before the client does, such as
        `asyncio.run(...)` (a `GatewayPool` closes its loop's sessions itself when it shuts down)."""
        with self._aio_lock:
            transport = self._aio.pop(asyncio.get_running_loop(), None)
        if transport is not None:
            await transport.close()

    def get_charge(self, charge_id: str) -> Charge:
        """GET charge/credit_card/{id}: whatever state the charge is in (approved, declined, voided)."""
        return self._call(GET_CHARGE, f"charge/credit_card/{_path_id('charge_id', charge_id)}")

    def refund(self, charge_id: str) -> Charge:
        """POST refund/credit_card: void a charge; returns the voided charge (202).

        Retried on transport faults (a refund is idempotent at Tpaga). When a retry meets a 406 whose charge is
        already voided, an earlier attempt did the void, so that is success. A 406 on the first attempt raises
        RefundRejectedError (outside the window, declined, or already voided by someone else).
        """
        _path_id("charge_id", charge_id)
        body = encode_json({"id": charge_id})
        for attempt in self._retrying(REFUND):
            with attempt:
                if self._rate_limiter is not None:
                    self._rate_limiter.acquire()
                raw = self._transport.send(REFUND, "refund/credit_card", auth=self._private_auth, body=body)
                try:
                    return map_response(REFUND, raw.status, raw.payload)
                except RefundRejectedError as rejected:
                    earlier = attempt.retry_state.attempt_number > 1
                    if earlier and rejected.charge is not None and rejected.charge.voided:
                        logger.info("tpaga refund: an earlier attempt had already voided the charge")
                        return rejected.charge
                    raise
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover
