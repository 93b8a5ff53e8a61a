"""The emulator's HTTP server: Tpaga's surface under /api/, the emulator's own under /__sandbox/.

Handlers stay thin: parse, call SandboxState, render. The hot path avoids per-request logging and rebuilds
nothing it can compute once (auth headers, canned error bodies).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from billing.sandbox import checkout, render
from billing.sandbox import faults as fault_kinds
from billing.sandbox.cards import mask
from billing.sandbox.clock import ClockError, iso
from billing.sandbox.errors import FieldError, NotFound, ValidationFailed
from billing.sandbox.faults import FaultPlan
from billing.sandbox.money import FEE_RATE, FIXED_FEE, RETE_ICA_RATE, RETE_IVA_RATE, RETE_RENTA_RATE, Rates
from billing.sandbox.state import REFUND_WINDOWS, Charge, RefundRecord, SandboxState
from billing.sandbox.validate import (
    CARD,
    CHARGE,
    CUSTOMER,
    REFUND,
    TOKEN,
    UnsafeJson,
    associate_request,
    charge_request,
    customer_request,
    legacy_card_request,
    load_json,
    parse_json,
    refund_request,
    tokenize_request,
)

log = logging.getLogger("billing.sandbox")

# The keys of the 2016 blog post (seed-tpaga-python-blog.md), so its code runs unchanged against the emulator.
DEFAULT_PRIVATE_KEY = "d13fr8n7vhvkuch3lq2ds5qhjnd2pdd2"
DEFAULT_PUBLIC_KEY = "pk_test_qvbvuthlvqpijnr0elmtg5jh"

PRIVATE = "private"
PUBLIC = "public"
_SHUTDOWN_TIMEOUT_SECONDS = 5.0
_START_TIMEOUT_SECONDS = 15.0
_JSON = "application/json"
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="Tpaga"'}
# The public-key endpoints are called from the browser (Tpaga's JS example, the seed's card form), so they answer
# CORS; the private-key ones do not, since a private key must never be in a browser.
_CORS_PATHS = frozenset({"/api/tokenize/credit_card"})
_CORS_ANSWER = {"Access-Control-Allow-Origin": "*"}
_CORS_PREFLIGHT = {
    **_CORS_ANSWER,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


# SandboxConfig's settlement fields, in the order of billing.sandbox.money.Rates.
_RATE_FIELDS = ("fee_fixed", "fee_rate", "rete_renta_rate", "rete_ica_rate", "rete_iva_rate")


@dataclass
class SandboxConfig:
    """How to run the emulator; port 0 picks a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    private_key: str = DEFAULT_PRIVATE_KEY
    public_key: str = DEFAULT_PUBLIC_KEY
    latency_ms: int = 0
    error_rate: float = 0.0
    drop_rate: float = 0.0
    garbage_rate: float = 0.0
    refund_window: str = "24h"
    seed: int | None = None
    # The settlement breakdown's formula (docs/sandbox.md, Fees); the defaults reproduce the blog's sample.
    fee_fixed: Decimal = FIXED_FEE
    fee_rate: Decimal = FEE_RATE
    rete_renta_rate: Decimal = RETE_RENTA_RATE
    rete_ica_rate: Decimal = RETE_ICA_RATE
    rete_iva_rate: Decimal = RETE_IVA_RATE

    @property
    def rates(self) -> Rates:
        return Rates(*(Decimal(getattr(self, name)) for name in _RATE_FIELDS))

    # False: lenient like Tpaga (Grails data binding, auth by user name, legacy card creation). True: only the
    # documented shapes, so a client that passes strict mode depends on none of that (docs/sandbox.md).
    strict: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if not self.private_key or not self.public_key:
            raise ValueError("the private and public keys must not be empty")
        if self.private_key == self.public_key:
            raise ValueError("the private and public keys must differ")
        if self.latency_ms < 0 or self.latency_ms > fault_kinds.MAX_LATENCY_MS:
            raise ValueError(f"latency_ms must be 0..{fault_kinds.MAX_LATENCY_MS}, got {self.latency_ms}")
        for name in ("error_rate", "drop_rate", "garbage_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        if self.refund_window not in REFUND_WINDOWS:
            raise ValueError(f"refund_window must be '24h' or 'same_day', got {self.refund_window!r}")
        for name in _RATE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Decimal | int):
                raise ValueError(f"{name} must be a Decimal or an int (exact, never a float), got {value!r}")
        self.rates.validate()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, payload: object) -> web.Response:
    return web.Response(body=render.dumps(payload), status=status, content_type=_JSON)


def _invalid(exc: ValidationFailed) -> web.Response:
    return _json(422, {"errors": [e.to_json() for e in exc.errors]})


def _not_found(exc: NotFound) -> web.Response:
    return _json(404, {"error": "Not Found", "message": str(exc)})


class Sandbox:
    """The HTTP face of one emulator: owns its state, fault plan and the handlers."""

    def __init__(self, config: SandboxConfig) -> None:
        config.validate()
        self.config = config
        self.state = SandboxState(
            config.private_key, config.public_key, config.refund_window, config.seed, rates=config.rates
        )
        self.faults = FaultPlan(
            latency_ms=config.latency_ms,
            error_rate=config.error_rate,
            drop_rate=config.drop_rate,
            garbage_rate=config.garbage_rate,
            seed=config.seed,
        )
        self._auth: dict[str, str] = {}
        self._sleepers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._rebuild_auth()

    # --- plumbing ---------------------------------------------------------------------------------------

    def _rebuild_auth(self) -> None:
        """Precomputes the exact headers well-behaved clients send, so the common case is one dict lookup."""

        def header(key: str) -> str:
            return "Basic " + base64.b64encode(f"{key}:".encode()).decode()

        self._auth = {header(self.state.private_key): PRIVATE, header(self.state.public_key): PUBLIC}

    def _scope(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        scope = self._auth.get(authorization)
        if scope is not None:
            return scope
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 inside: not a key either way
            return None
        user, colon, password = decoded.partition(":")
        if self.config.strict:
            if not colon or password:
                return None  # Tpaga's documented scheme: the key as user name and an empty password
        else:
            # Tpaga authenticated by the user name alone: a production shop sent `key + ": "` (and `pk + " "`,
            # no colon at all) from its first sandbox version to production.
            user = user.strip()
        return self._auth.get("Basic " + base64.b64encode(f"{user}:".encode()).decode())

    async def _sleep(self, seconds: float) -> None:
        """A pause that shutdown can cut short, so stop() never waits for injected latency."""
        if seconds <= 0 or self._closing:
            return
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - handlers always run in a task
            await asyncio.sleep(seconds)
            return
        self._sleepers.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._sleepers.discard(task)

    async def on_shutdown(self, _app: web.Application) -> None:
        self._closing = True
        for task in list(self._sleepers):
            task.cancel()

    def api(self, name: str, scope: str) -> Callable[[Handler], Handler]:
        """Wraps an /api handler with Tpaga's transport rules: latency, key scope, 404 and 422 mapping."""

        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: web.Request) -> web.StreamResponse:
                stats = self.state.stats.requests
                stats[name] = stats.get(name, 0) + 1
                if self.faults.latency_ms:
                    await self._sleep(self.faults.latency_seconds)
                if self._scope(request.headers.get("Authorization")) != scope:
                    return web.Response(
                        body=_UNAUTHORIZED, status=401, content_type=_JSON, headers=_UNAUTHORIZED_HEADERS
                    )
                try:
                    return await handler(request)
                except ValidationFailed as exc:
                    return _invalid(exc)
                except NotFound as exc:
                    return _not_found(exc)

            return endpoint

        return wrap

    # --- fault delivery ---------------------------------------------------------------------------------

    def _fault_answer(self) -> web.Response:
        self.state.stats.faults[fault_kinds.ERROR] += 1
        status, body, content_type = self.faults.error_answer()
        return web.Response(body=body, status=status, content_type=content_type)

    async def _deliver(
        self,
        request: web.Request,
        fault: str,
        status: int,
        body: bytes,
        record: Charge | RefundRecord | None,
    ) -> web.StreamResponse:
        """Sends the real answer, or loses it the way the fault says; `record` learns how it went out."""
        stats = self.state.stats.faults
        if fault == fault_kinds.DROP:
            stats[fault_kinds.DROP] += 1
            transport = request.transport
            if transport is not None:
                # abort() resets the connection: the client sees it dropped and never reads a response.
                transport.abort()
            # aiohttp cannot write this to the aborted transport and treats it as a client disconnect.
            return web.Response(body=body, status=status, content_type=_JSON)
        if fault == fault_kinds.GARBAGE:
            stats[fault_kinds.GARBAGE] += 1
            status, body, content_type = self.faults.garbage_answer(status, body)
            return web.Response(body=body, status=status, content_type=content_type)
        if fault == fault_kinds.SLOW:
            stats[fault_kinds.SLOW] += 1
            try:
                await self._sleep(self.faults.slow_seconds)
            except asyncio.CancelledError:
                if record is not None:
                    record.delivery = "dropped"
                raise
            transport = request.transport
            if (transport is None or transport.is_closing()) and record is not None:
                record.delivery = "dropped"  # the client gave up before the late answer
        return web.Response(body=body, status=status, content_type=_JSON)

    @staticmethod
    def _delivery(fault: str) -> str:
        return {fault_kinds.DROP: "dropped", fault_kinds.GARBAGE: "garbage"}.get(fault, "ok")

    # --- Tpaga: customers -------------------------------------------------------------------------------

    async def create_customer(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(await request.read(), request.charset, CUSTOMER)
        customer = self.state.create_customer(customer_request(body, strict=self.config.strict))
        return _json(201, render.customer(customer))

    async def get_customer(self, request: web.Request) -> web.StreamResponse:
        return _json(200, render.customer(self.state.get_customer(request.match_info["customer_id"])))

    async def delete_customer(self, request: web.Request) -> web.StreamResponse:
        self.state.delete_customer(request.match_info["customer_id"])
        return web.Response(status=204)

    # --- Tpaga: cards -----------------------------------------------------------------------------------

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        body = parse_json(await request.read(), request.charset, TOKEN)
        token = self.state.tokenize(tokenize_request(body, strict=self.config.strict))
        return _json(201, render.token(token))

    async def associate(self, request: web.Request) -> web.StreamResponse:
        customer_id = request.match_info["customer_id"]
        self.state.get_customer(customer_id)  # an unknown customer is a 404 even when the body is bad
        body = parse_json(await request.read(), request.charset, CARD)
        card = self.state.associate(customer_id, associate_request(body, strict=self.config.strict))
        return _json(201, render.card(card))

    async def create_card(self, request: web.Request) -> web.StreamResponse:
        """Legacy `POST customer/{id}/credit_card` (a raw card number with the private key): lenient mode only,
        since a client that relies on it may not pass today's Tpaga, which documents tokenize + associate."""
        customer_id = request.match_info["customer_id"]
        if self.config.strict:
            raise NotFound("the legacy card creation from a raw number is off in strict mode: tokenize, then associate")
        self.state.get_customer(customer_id)
        body = parse_json(await request.read(), request.charset, CARD, holds_card_number=True)
        card = self.state.create_card(customer_id, legacy_card_request(body, strict=False))
        return _json(201, render.card(card))

    async def get_card(self, request: web.Request) -> web.StreamResponse:
        card = self.state.get_card(request.match_info["customer_id"], request.match_info["card_id"])
        return _json(200, render.card(card))

    async def delete_card(self, request: web.Request) -> web.StreamResponse:
        self.state.delete_card(request.match_info["customer_id"], request.match_info["card_id"])
        return web.Response(status=204)

    # --- Tpaga: charges and refunds ---------------------------------------------------------------------

    async def charge(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.next_for_charge()
        if fault == fault_kinds.ERROR:
            return self._fault_answer()  # before reading the body: a 5xx here never charges
        record: Charge | None = None
        try:
            body = parse_json(await request.read(), request.charset, CHARGE)
            record = self.state.charge(charge_request(body, strict=self.config.strict), self._delivery(fault))
            status, payload = (201 if record.approved else 402), render.dumps(render.charge(record))
        except ValidationFailed as exc:
            self.state.stats.charges["invalid"] += 1
            status, payload = 422, render.dumps({"errors": [e.to_json() for e in exc.errors]})
        return await self._deliver(request, fault, status, payload, record)

    async def get_charge(self, request: web.Request) -> web.StreamResponse:
        return _json(200, render.charge(self.state.get_charge(request.match_info["charge_id"])))

    async def refund(self, request: web.Request) -> web.StreamResponse:
        fault = self.faults.next_for_refund()
        if fault == fault_kinds.ERROR:
            return self._fault_answer()
        record: RefundRecord | None = None
        try:
            body = parse_json(await request.read(), request.charset, REFUND)
            result = self.state.refund(refund_request(body, strict=self.config.strict), self._delivery(fault))
            record = result.record
            status = 202 if result.voided else 406
            payload = render.dumps(render.charge(result.charge))
        except ValidationFailed as exc:
            status, payload = 422, render.dumps({"errors": [e.to_json() for e in exc.errors]})
        except NotFound as exc:
            status, payload = 404, render.dumps({"error": "Not Found", "message": str(exc)})
        return await self._deliver(request, fault, status, payload, record)

    # --- /__sandbox/ ------------------------------------------------------------------------------------

    async def ledger(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        charges, refunds = self.state.ledger(query.get("orderId"), query.get("creditCard"))
        return _json(200, render.ledger(charges, refunds))

    async def report(self, request: web.Request) -> web.StreamResponse:
        errors: list[FieldError] = []
        bounds: dict[str, datetime | None] = {}
        for name in ("from", "to"):
            raw = request.query.get(name)
            bounds[name] = None
            if raw is None or not raw.strip():
                continue
            try:
                when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
            except ValueError:
                errors.append(FieldError("Report", name, raw, "must be an ISO 8601 date and time"))
                continue
            if when.tzinfo is None:
                errors.append(
                    FieldError("Report", name, raw, "must carry a UTC offset, e.g. 2026-01-01T00:00:00-05:00")
                )
                continue
            bounds[name] = when
        start, end = bounds.get("from"), bounds.get("to")
        if not errors and start is not None and end is not None and start >= end:
            errors.append(FieldError("Report", "to", request.query.get("to"), "must be after from"))
        if errors:
            return _invalid(ValidationFailed(*errors))
        body = render.report_csv(self.state.report(start, end))
        return web.Response(
            body=body,
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": 'attachment; filename="transactions.csv"'},
        )

    async def stats(self, _request: web.Request) -> web.StreamResponse:
        return _json(200, self.state.stats.to_json())

    async def get_faults(self, _request: web.Request) -> web.StreamResponse:
        return _json(200, self.faults.to_json())

    async def set_faults(self, request: web.Request) -> web.StreamResponse:
        return await _control(request, self._update_faults)

    def _update_faults(self, body: dict[str, Any]) -> dict[str, object]:
        self.faults.update(body)
        return self.faults.to_json()

    async def get_clock(self, _request: web.Request) -> web.StreamResponse:
        return _json(200, {"now": iso(self.state.clock.now())})

    async def set_clock(self, request: web.Request) -> web.StreamResponse:
        return await _control(request, self._move_clock)

    def _move_clock(self, body: dict[str, Any]) -> dict[str, object]:
        clock = self.state.clock
        has_advance, has_now = "advanceSeconds" in body, "now" in body
        if has_advance == has_now:
            raise ValidationFailed.one("Clock", "advanceSeconds", None, "send exactly one of advanceSeconds, now")
        try:
            if has_advance:
                seconds = body["advanceSeconds"]
                if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                    raise ValidationFailed.one("Clock", "advanceSeconds", seconds, "must be a number of seconds")
                clock.advance(seconds)
            else:
                raw = body["now"]
                if not isinstance(raw, str):
                    raise ValidationFailed.one("Clock", "now", raw, "must be an ISO 8601 string")
                try:
                    when = datetime.fromisoformat(raw)
                except ValueError:
                    raise ValidationFailed.one("Clock", "now", raw, "must be an ISO 8601 string") from None
                clock.set(when)
        except ClockError as exc:
            field = "advanceSeconds" if has_advance else "now"
            raise ValidationFailed.one("Clock", field, body.get(field), str(exc)) from None
        return {"now": iso(clock.now())}

    async def script(self, request: web.Request) -> web.StreamResponse:
        return await _control(request, self._set_script)

    def _set_script(self, body: dict[str, Any]) -> dict[str, object]:
        card_id, number, outcomes = body.get("creditCard"), body.get("primaryAccountNumber"), body.get("outcomes")
        errors: list[FieldError] = []
        if (card_id is None) == (number is None):
            errors.append(FieldError("Script", "creditCard", card_id, "send creditCard or primaryAccountNumber"))
        elif card_id is not None and not isinstance(card_id, str):
            errors.append(FieldError("Script", "creditCard", card_id, "must be a string"))
        elif number is not None:
            number = str(number).replace(" ", "").replace("-", "")
            if not number.isdigit():
                errors.append(FieldError("Script", "primaryAccountNumber", mask(number), "must be digits"))
        codes: list[str] = []
        if not isinstance(outcomes, list) or not all(isinstance(o, str) and len(o) <= 8 for o in outcomes):
            errors.append(FieldError("Script", "outcomes", outcomes, 'must be a list of errorCodes like "51"'))
        else:
            # Tpaga zero-pads short codes; "" is kept as is, it is one of the two unknown-outcome codes.
            codes = [o.strip().zfill(2) if o.strip() else "" for o in outcomes]
        if errors:
            raise ValidationFailed(*errors)
        self.state.set_script(card_id=card_id, number=number, outcomes=codes)
        target = {"creditCard": card_id} if card_id is not None else {"primaryAccountNumber": mask(str(number))}
        return {**target, "outcomes": codes}

    async def keys(self, request: web.Request) -> web.StreamResponse:
        return await _control(request, self._set_keys)

    def _set_keys(self, body: dict[str, Any]) -> dict[str, object]:
        errors = [
            FieldError("Keys", name, "***", "must be a non-empty string")
            for name in ("privateKey", "publicKey")
            if name in body and not (isinstance(body[name], str) and body[name])
        ]
        if errors:
            raise ValidationFailed(*errors)
        self.state.set_keys(body.get("privateKey"), body.get("publicKey"))
        self._rebuild_auth()
        return {"rotated": sorted(name for name in ("privateKey", "publicKey") if name in body)}

    async def checkout(self, request: web.Request) -> web.StreamResponse:
        return checkout.response(request.query.get("return_to"), self.state.public_key, self.state.clock.now())

    async def reset(self, _request: web.Request) -> web.StreamResponse:
        self.state.reset()
        self.faults.reset()
        self._rebuild_auth()
        return _json(200, {"reset": True})

    def routes(self) -> list[web.RouteDef]:
        api = self.api
        return [
            web.post("/api/customer", api("POST customer", PRIVATE)(self.create_customer)),
            web.get("/api/customer/{customer_id}", api("GET customer", PRIVATE)(self.get_customer)),
            web.delete("/api/customer/{customer_id}", api("DELETE customer", PRIVATE)(self.delete_customer)),
            web.post("/api/tokenize/credit_card", api("POST tokenize/credit_card", PUBLIC)(self.tokenize)),
            web.post(
                "/api/customer/{customer_id}/credit_card",
                api("POST customer/credit_card", PRIVATE)(self.create_card),
            ),
            web.post(
                "/api/customer/{customer_id}/credit_card_token",
                api("POST customer/credit_card_token", PRIVATE)(self.associate),
            ),
            web.get(
                "/api/customer/{customer_id}/credit_card/{card_id}",
                api("GET customer/credit_card", PRIVATE)(self.get_card),
            ),
            web.delete(
                "/api/customer/{customer_id}/credit_card/{card_id}",
                api("DELETE customer/credit_card", PRIVATE)(self.delete_card),
            ),
            web.post("/api/charge/credit_card", api("POST charge/credit_card", PRIVATE)(self.charge)),
            web.get("/api/charge/credit_card/{charge_id}", api("GET charge/credit_card", PRIVATE)(self.get_charge)),
            web.post("/api/refund/credit_card", api("POST refund/credit_card", PRIVATE)(self.refund)),
            web.get("/__sandbox/ledger", self.ledger),
            web.get("/__sandbox/report.csv", self.report),
            web.get("/__sandbox/stats", self.stats),
            web.get("/__sandbox/faults", self.get_faults),
            web.post("/__sandbox/faults", self.set_faults),
            web.get("/__sandbox/clock", self.get_clock),
            web.post("/__sandbox/clock", self.set_clock),
            web.post("/__sandbox/script", self.script),
            web.post("/__sandbox/keys", self.keys),
            web.post("/__sandbox/reset", self.reset),
            web.get("/__sandbox/checkout", self.checkout),
        ]


async def _control(request: web.Request, apply: Callable[[dict[str, Any]], object]) -> web.Response:
    """Parses a /__sandbox/ body (plain JSON: no money here) and maps ValidationFailed to 422."""
    raw = await request.read()
    try:
        body = load_json(raw, request.charset) if raw.strip() else {}
    except ValueError as exc:
        return _invalid(ValidationFailed.one("Sandbox", "body", None, f"the body must be JSON: {exc}"))
    except UnsafeJson as exc:
        return _invalid(ValidationFailed.one("Sandbox", "body", None, str(exc)))
    if not isinstance(body, dict):
        return _invalid(ValidationFailed.one("Sandbox", "body", body, "the body must be a JSON object"))
    try:
        return _json(200, apply(body))
    except ValidationFailed as exc:
        return _invalid(exc)


@web.middleware
async def _cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers the browser's preflight and lets it read every answer of a public-key endpoint, errors included."""
    if request.path not in _CORS_PATHS:
        return await handler(request)
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=_CORS_PREFLIGHT)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 405, 413: aiohttp's own answers, which a browser must be able to read too
        exc.headers.update(_CORS_ANSWER)
        raise
    response.headers.update(_CORS_ANSWER)
    return response


SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def make_app(config: SandboxConfig) -> web.Application:
    """The aiohttp application of one emulator; its Sandbox is at app[SANDBOX_KEY]."""
    sandbox = Sandbox(config)
    app = web.Application(middlewares=[_cors])
    app[SANDBOX_KEY] = sandbox
    app.add_routes(sandbox.routes())
    app.on_shutdown.append(sandbox.on_shutdown)
    return app


class SandboxServer:
    """Starts and stops one emulator on the running event loop."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.app = make_app(config)
        self._runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def sandbox(self) -> Sandbox:
        return self.app[SANDBOX_KEY]

    async def start(self) -> int:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
        await runner.setup()
        # A deep backlog so a thousand clients connecting at once are queued, not refused.
        site = web.TCPSite(runner, self.config.host, self.config.port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


def _url(host: str, port: int) -> str:
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{port}/"


def _client_host(host: str) -> str:
    """Where a local client should connect: a wildcard bind address is reachable on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class SandboxThread:
    """An emulator on its own event loop in a daemon thread; for tests and the embedded demo."""

    def __init__(self, config: SandboxConfig) -> None:
        config.validate()
        self.config = config
        self._server: SandboxServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sandbox is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return _url(_client_host(self.config.host), self.port)

    @property
    def api_url(self) -> str:
        return self.base_url + "api/"

    @property
    def sandbox(self) -> Sandbox:
        """The running emulator; touch its state only through HTTP or from its own loop."""
        if self._server is None:
            raise RuntimeError("the sandbox is not started")
        return self._server.sandbox

    def start(self) -> SandboxThread:
        if self._thread is not None:
            raise RuntimeError("the sandbox is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        server = SandboxServer(self.config)

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._port = loop.run_until_complete(server.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(server.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=serve, name="tpaga-sandbox", daemon=True)
        thread.start()
        if not ready.wait(_START_TIMEOUT_SECONDS):
            raise RuntimeError("the sandbox did not start in time")
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread, self._server = loop, thread, server
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_SHUTDOWN_TIMEOUT_SECONDS * 2)
        self._server = None
        self._port = None

    def __enter__(self) -> SandboxThread:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def listening_line(config: SandboxConfig, port: int) -> str:
    return (
        f"Tpaga sandbox listening on {_url(config.host, port)}api/ "
        f"(private key {config.private_key}, public key {config.public_key})"
    )


def run(config: SandboxConfig) -> None:
    """Serve until SIGINT or SIGTERM; prints one flushed line once listening (tools wait for it)."""
    asyncio.run(_serve(config))


async def _serve(config: SandboxConfig) -> None:
    server = SandboxServer(config)
    port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    print(listening_line(config, port), flush=True)
    log.info("Tpaga sandbox listening on %s", _url(config.host, port))
    try:
        await stop.wait()
    finally:
        await server.stop()
        log.info("Tpaga sandbox stopped")
