"""A fake Tpaga gateway with the client's interface and its real error classes, for service tests."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.gateway import errors as gw
from billing.gateway.models import Charge, CreditCard, Customer

# What a fake card does on each charge: "00" approves, a code declines, "unknown" raises
# OutcomeUnknownError after charging, "unknown_no_charge" raises it without charging,
# "not_sent" raises NotSentError, "401" raises UnauthorizedError.
DEFAULT_SCRIPT = ("00",)


@dataclass
class FakeGateway:
    """Keeps a ledger like the emulator's; scripts per temp token decide each card's outcomes."""

    charges: list[Charge] = field(default_factory=list)
    voided: set[str] = field(default_factory=set)
    scripts: dict[str, list[str]] = field(default_factory=dict)
    validation_fail: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    authorized: bool = True

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._card_scripts: dict[str, list[str]] = {}

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    def create_customer(self, **fields: Any) -> Customer:
        self.calls["create_customer"] += 1
        return Customer(
            id=self._id("cus"),
            first_name=fields.get("first_name"),
            last_name=fields.get("last_name"),
            email=fields.get("email"),
            phone=None,
            merchant_customer_id=fields.get("merchant_customer_id"),
        )

    def associate_card(self, customer_id: str, temp_token: str) -> CreditCard:
        self.calls["associate_card"] += 1
        card_id = self._id("card")
        self._card_scripts[card_id] = list(self.scripts.get(temp_token, DEFAULT_SCRIPT))
        failed = temp_token in self.validation_fail
        return CreditCard(
            id=card_id,
            customer_id=customer_id,
            bin="411111",
            last_four="1111",
            brand="VISA",
            expiration_month=12,
            expiration_year=2030,
            card_holder_name="Test",
            fingerprint=None,
            validation_successful=not failed,
            validation_error_code="04" if failed else "00",
        )

    def script_card(self, card_id: str, outcomes: list[str]) -> None:
        self._card_scripts[card_id] = list(outcomes)

    def _next_outcome(self, card_id: str) -> str:
        script = self._card_scripts.setdefault(card_id, list(DEFAULT_SCRIPT))
        return script.pop(0) if len(script) > 1 else script[0]

    def _charge(self, card_id: str, amount: Decimal, currency: str, order_id: str, code: str, paid: bool) -> Charge:
        return Charge(
            id=self._id("ch"),
            amount=amount,
            currency=currency,
            card_id=card_id,
            customer_id=None,
            order_id=order_id,
            paid=paid,
            status="authorized" if paid else "processor_declined",
            authorization_code="123456" if paid else None,
            error_code=code,
            error_message="Approved" if paid else "Declined",
            installments=1,
            net_amount=None,
            tpaga_fee_amount=None,
            date_created=datetime(2026, 1, 1, tzinfo=UTC),
        )

    def charge(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge:
        if deadline is not None and time.monotonic() > deadline:
            raise gw.DeadlineExceededError("the call's deadline passed before its request was written")
        with self._lock:
            self.calls["charge"] += 1
            if not self.authorized:
                raise gw.UnauthorizedError("unauthorized", http_status=401)
            outcome = self._next_outcome(card_id)
            if outcome == "not_sent":
                raise gw.NotSentError("connection refused")
            if outcome == "401":
                raise gw.UnauthorizedError("unauthorized", http_status=401)
            if outcome == "unknown_no_charge":
                raise gw.OutcomeUnknownError("timeout", reason="timeout")
            if outcome == "unknown":
                charge = self._charge(card_id, amount, currency, order_id, "00", True)
                self.charges.append(charge)
                raise gw.OutcomeUnknownError("dropped", reason="dropped")
            if outcome == "9999":
                charge = self._charge(card_id, amount, currency, order_id, "9999", False)
                self.charges.append(charge)
                raise gw.OutcomeUnknownError("9999", reason="unknown_code", http_status=402, charge_id=charge.id)
            paid = outcome == "00"
            charge = self._charge(card_id, amount, currency, order_id, outcome, paid)
            self.charges.append(charge)
            if not paid:
                raise gw.DeclinedError("declined", charge=charge)
            return charge

    async def charge_async(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge:
        """`charge` as the batch path calls it: a coroutine on the pool's event loop."""
        await asyncio.sleep(0)
        return self.charge(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            description=description,
            tax_amount=tax_amount,
            iac_amount=iac_amount,
            deadline=deadline,
        )

    def get_charge(self, charge_id: str) -> Charge:
        self.calls["get_charge"] += 1
        if not self.authorized:
            raise gw.UnauthorizedError("unauthorized", http_status=401)
        for charge in self.charges:
            if charge.id == charge_id:
                return charge
        raise gw.NotFoundError("no such charge", http_status=404)

    def refund(self, charge_id: str) -> Charge:
        self.calls["refund"] += 1
        charge = self.get_charge(charge_id)
        if charge_id in self.voided or not charge.paid:
            raise gw.RefundRejectedError("not refundable", charge=charge)
        self.voided.add(charge_id)
        return charge

    def approved_by_order(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for charge in self.charges:
            if charge.paid and charge.id not in self.voided:
                counts[charge.order_id or ""] += 1
        return dict(counts)
