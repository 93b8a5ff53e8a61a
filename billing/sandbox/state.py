"""Everything the emulator remembers, with Tpaga's rules applied; no HTTP here.

Only the server's event-loop thread touches a SandboxState, so it needs no locks.
"""

from __future__ import annotations

import random
import string
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from billing.sandbox import cards
from billing.sandbox.clock import BOGOTA, SandboxClock, same_bogota_day
from billing.sandbox.errors import NotFound, ValidationFailed
from billing.sandbox.money import DEFAULT_RATES, Breakdown, Rates, breakdown
from billing.sandbox.validate import (
    CARD,
    CHARGE,
    TOKEN,
    AssociateRequest,
    ChargeRequest,
    CustomerRequest,
    TokenizeRequest,
)

REFUND_WINDOWS = ("24h", "same_day")
DELIVERIES = ("ok", "dropped", "garbage", "5xx")
_ID_ALPHABET = string.digits + string.ascii_lowercase
# Maps each random byte to one of the 36 id characters in one C call (the modulo bias is irrelevant here).
_ID_TABLE = bytes(_ID_ALPHABET[b % 36].encode()[0] for b in range(256))
_VOID_WINDOW = timedelta(hours=24)

# transactionInfo.status values (tpaga-api.md section 3)
AUTHORIZED = "authorized"
DECLINED = "processor_declined"
CREATED = "created"
VOIDED = "voided"


@dataclass(slots=True)
class Customer:
    id: str
    fields: dict[str, object]
    created_at: datetime
    card_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Token:
    id: str
    card: TokenizeRequest
    created_at: datetime
    used: bool = False


@dataclass(slots=True)
class Card:
    id: str
    customer_id: str
    number: str  # kept only in memory to apply the test-card rules; never logged, never rendered
    brand: str
    expiration_month: int
    expiration_year: int
    holder_name: str
    extra: dict[str, str | None]
    validation_code: str
    created_at: datetime
    rule_charges: int = 0
    charge_ids: list[str] = field(default_factory=list)

    def expired_at(self, moment: datetime) -> bool:
        local = moment.astimezone(BOGOTA)
        return (local.year, local.month) > (self.expiration_year, self.expiration_month)


@dataclass(slots=True)
class Charge:
    id: str
    request: ChargeRequest
    card_id: str
    customer_id: str
    error_code: str
    status: str
    authorization_code: str | None
    payment_transaction: str | None
    fees: Breakdown
    created_at: datetime
    delivery: str
    voided_at: datetime | None = None

    @property
    def approved(self) -> bool:
        """Approved by the network, whether or not it was voided later."""
        return self.error_code == cards.APPROVED and self.status in (AUTHORIZED, VOIDED)

    @property
    def outcome(self) -> str:
        if self.approved:
            return "approved"
        return "unknown" if self.error_code in cards.UNKNOWN_CODES else "declined"


@dataclass(slots=True)
class RefundRecord:
    charge_id: str
    outcome: str  # "voided" or "refused"
    reason: str | None
    created_at: datetime
    delivery: str


@dataclass(frozen=True, slots=True)
class RefundResult:
    charge: Charge
    record: RefundRecord

    @property
    def voided(self) -> bool:
        return self.record.outcome == "voided"

    @property
    def reason(self) -> str | None:
        return self.record.reason


@dataclass(slots=True)
class Stats:
    """Counters for /__sandbox/stats; the HTTP layer bumps requests and faults, the state the rest."""

    requests: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("5xx", "drop", "garbage", "slow"), 0))
    charges: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("approved", "declined", "unknown", "invalid"), 0)
    )
    refunds: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("voided", "refused"), 0))

    def to_json(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "charges": dict(self.charges),
            "refunds": dict(self.refunds),
        }


class SandboxState:
    """Customers, tokens, cards, charges and the ledger, plus scripted outcomes, keys and the clock."""

    def __init__(
        self,
        private_key: str,
        public_key: str,
        refund_window: str = "24h",
        seed: int | None = None,
        *,
        rates: Rates = DEFAULT_RATES,
    ) -> None:
        if refund_window not in REFUND_WINDOWS:
            raise ValueError(f"refund_window must be one of {REFUND_WINDOWS}, got {refund_window!r}")
        self._configured_keys = (private_key, public_key)
        self.refund_window = refund_window
        self.rates = rates
        self._seed = seed
        self.clock = SandboxClock()
        self.reset()

    def reset(self) -> None:
        self.private_key, self.public_key = self._configured_keys
        self.clock.reset()
        self._ids = random.Random(self._seed)
        self.customers: dict[str, Customer] = {}
        self.tokens: dict[str, Token] = {}
        self.cards: dict[str, Card] = {}
        self.charges: dict[str, Charge] = {}
        self.refunds: list[RefundRecord] = []
        self.card_scripts: dict[str, deque[str]] = {}
        self.number_scripts: dict[str, deque[str]] = {}
        self.stats = Stats()

    # --- keys -------------------------------------------------------------------------------------------

    def set_keys(self, private_key: str | None, public_key: str | None) -> None:
        new_private = private_key if private_key is not None else self.private_key
        new_public = public_key if public_key is not None else self.public_key
        if new_private == new_public:
            # One key for both scopes would make the 401 for a wrong scope impossible to emulate.
            raise ValidationFailed.one("Keys", "publicKey", None, "the public and private keys must differ")
        self.private_key, self.public_key = new_private, new_public

    # --- ids --------------------------------------------------------------------------------------------

    def _new_id(self) -> str:
        while True:
            candidate = self._ids.getrandbits(256).to_bytes(32, "big").translate(_ID_TABLE).decode()
            # 36**32 makes a clash absurd, but a seeded run must never hand out one id twice.
            if not any(candidate in table for table in (self.customers, self.cards, self.charges, self.tokens)):
                return candidate

    # --- customers --------------------------------------------------------------------------------------

    def create_customer(self, request: CustomerRequest) -> Customer:
        customer = Customer(self._new_id(), dict(request.fields), self.clock.now())
        self.customers[customer.id] = customer
        return customer

    def get_customer(self, customer_id: str) -> Customer:
        customer = self.customers.get(customer_id)
        if customer is None:
            raise NotFound(f"no customer {customer_id}")
        return customer

    def delete_customer(self, customer_id: str) -> None:
        customer = self.get_customer(customer_id)
        if customer.card_ids:
            raise ValidationFailed.one("Customer", "id", customer_id, "a customer with credit cards cannot be deleted")
        del self.customers[customer_id]

    # --- cards ------------------------------------------------------------------------------------------

    def _refuse_expired(self, request: TokenizeRequest, obj: str) -> None:
        now = self.clock.now().astimezone(BOGOTA)
        if request.expiration_year < now.year:
            raise ValidationFailed.one(obj, "expirationYear", request.expiration_year, "the card has expired")
        if request.expiration_year == now.year and request.expiration_month < now.month:
            raise ValidationFailed.one(obj, "expirationMonth", request.expiration_month, "the card has expired")

    def tokenize(self, request: TokenizeRequest) -> Token:
        self._refuse_expired(request, TOKEN)
        token = Token(self._new_id(), request, self.clock.now())
        self.tokens[token.id] = token
        return token

    def associate(self, customer_id: str, request: AssociateRequest) -> Card:
        customer = self.get_customer(customer_id)
        token = self.tokens.get(request.token)
        if token is None:
            raise ValidationFailed.one(CARD, "token", request.token, "unknown credit card token")
        if token.used:
            raise ValidationFailed.one(CARD, "token", request.token, "the credit card token was already used")
        token.used = True
        return self._new_card(customer, token.card)

    def create_card(self, customer_id: str, request: TokenizeRequest) -> Card:
        """The legacy card creation from a raw number with the private key (Tpaga's Ruby README): test cards only,
        so that no real card number is ever sent to, or kept by, the emulator."""
        customer = self.get_customer(customer_id)
        if request.number not in cards.TEST_CARDS:
            raise ValidationFailed.one(
                CARD,
                "primaryAccountNumber",
                cards.mask(request.number),
                "only the emulator's test cards can be created from a raw number (docs/sandbox.md)",
            )
        self._refuse_expired(request, CARD)
        return self._new_card(customer, request)

    def _new_card(self, customer: Customer, data: TokenizeRequest) -> Card:
        card = Card(
            id=self._new_id(),
            customer_id=customer.id,
            number=data.number,
            brand=cards.brand(data.number),
            expiration_month=data.expiration_month,
            expiration_year=data.expiration_year,
            holder_name=data.holder_name,
            extra=dict(data.extra),
            validation_code=cards.validation_code(data.number),
            created_at=self.clock.now(),
        )
        self.cards[card.id] = card
        customer.card_ids.append(card.id)
        return card

    def get_card(self, customer_id: str, card_id: str) -> Card:
        customer = self.get_customer(customer_id)
        card = self.cards.get(card_id)
        if card is None or card.customer_id != customer.id:
            raise NotFound(f"no credit card {card_id} for customer {customer_id}")
        return card

    def delete_card(self, customer_id: str, card_id: str) -> None:
        card = self.get_card(customer_id, card_id)
        if card.charge_ids:
            raise ValidationFailed.one(CARD, "id", card_id, "a credit card with charges cannot be deleted")
        del self.cards[card_id]
        self.customers[customer_id].card_ids.remove(card_id)

    # --- charges ----------------------------------------------------------------------------------------

    def charge(self, request: ChargeRequest, delivery: str = "ok") -> Charge:
        card = self.cards.get(request.credit_card)
        if card is None:
            raise ValidationFailed.one(CHARGE, "creditCard", request.credit_card, "unknown credit card")
        now = self.clock.now()
        code = self._next_code(card, now)
        approved = code == cards.APPROVED
        unknown = code in cards.UNKNOWN_CODES
        charge = Charge(
            id=self._new_id(),
            request=request,
            card_id=card.id,
            customer_id=card.customer_id,
            error_code=code,
            status=AUTHORIZED if approved else CREATED if unknown else DECLINED,
            authorization_code=f"{self._ids.randrange(1_000_000):06d}" if approved else None,
            payment_transaction=None if unknown else self._new_id(),
            fees=breakdown(request.amount, request.tax_amount, request.iac_amount, self.rates),
            created_at=now,
            delivery=delivery,
        )
        self.charges[charge.id] = charge
        card.charge_ids.append(charge.id)
        self.stats.charges[charge.outcome] += 1
        return charge

    def _next_code(self, card: Card, now: datetime) -> str:
        script = self.card_scripts.get(card.id) or self.number_scripts.get(card.number)
        if script:
            return script.popleft()
        if card.expired_at(now):
            return "54"
        code = cards.charge_code(card.number, card.rule_charges)
        card.rule_charges += 1
        return code

    def get_charge(self, charge_id: str) -> Charge:
        charge = self.charges.get(charge_id)
        if charge is None:
            raise NotFound(f"no charge {charge_id}")
        return charge

    def refund(self, charge_id: str, delivery: str = "ok") -> RefundResult:
        charge = self.get_charge(charge_id)
        now = self.clock.now()
        reason = self._refusal(charge, now)
        if reason is None:
            charge.status = VOIDED
            charge.voided_at = now
        outcome = "refused" if reason else "voided"
        record = RefundRecord(charge.id, outcome, reason, now, delivery)
        self.refunds.append(record)
        self.stats.refunds[outcome] += 1
        return RefundResult(charge, record)

    def _refusal(self, charge: Charge, now: datetime) -> str | None:
        if charge.status == VOIDED:
            return "already voided"
        if not charge.approved:
            return "not approved"
        if self.refund_window == "same_day":
            if not same_bogota_day(charge.created_at, now):
                return "void window passed (same day in America/Bogota)"
        elif now - charge.created_at >= _VOID_WINDOW:
            return "void window passed (24 hours)"
        return None

    # --- /__sandbox/ ------------------------------------------------------------------------------------

    def set_script(self, *, card_id: str | None, number: str | None, outcomes: list[str]) -> None:
        if card_id is not None:
            if card_id not in self.cards:
                raise ValidationFailed.one("Script", "creditCard", card_id, "unknown credit card")
            self.card_scripts[card_id] = deque(outcomes)
        elif number is not None:
            self.number_scripts[number] = deque(outcomes)

    def ledger(
        self, order_id: str | None = None, credit_card: str | None = None
    ) -> tuple[list[Charge], list[tuple[RefundRecord, Charge]]]:
        """Charges and refunds in arrival order, optionally only those of one orderId and/or card."""

        def wanted(charge: Charge) -> bool:
            return (order_id is None or charge.request.order_id == order_id) and (
                credit_card is None or charge.card_id == credit_card
            )

        charges = [c for c in self.charges.values() if wanted(c)]
        refunds = [(r, self.charges[r.charge_id]) for r in self.refunds]
        return charges, [(r, c) for r, c in refunds if wanted(c)]

    def report(self, start: datetime | None = None, end: datetime | None = None) -> list[Charge]:
        """Charges dated in [start, end), oldest first: what the merchant dashboard's transaction report lists."""
        return sorted(
            (
                c
                for c in self.charges.values()
                if (start is None or c.created_at >= start) and (end is None or c.created_at < end)
            ),
            key=lambda c: c.created_at,
        )
