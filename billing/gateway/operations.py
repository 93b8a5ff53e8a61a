"""The calls the client makes, each knowing what success looks like and whether a retry is safe."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from billing.gateway.models import (
    Charge,
    CreditCard,
    Customer,
    parse_charge,
    parse_credit_card,
    parse_customer,
    parse_token,
)

T = TypeVar("T")

Money = Literal["charge", "refund"]


@dataclass(frozen=True)
class Operation(Generic[T]):
    """One Tpaga endpoint: its name (for logs), method, success status and how to read its answer.

    `idempotent` means sending the request twice has the effect of sending it once: reads, and a refund
    (a refund of an already voided charge is a 406). Creates and charges are not: a retried charge may charge
    twice, and Tpaga has no idempotency key.
    """

    name: str
    method: Literal["GET", "POST"]
    idempotent: bool
    success_status: int
    parse: Callable[[Mapping[str, Any]], T] = field(repr=False, compare=False)
    money: Money | None = None


CREATE_CUSTOMER: Operation[Customer] = Operation("create_customer", "POST", False, 201, parse_customer)
GET_CUSTOMER: Operation[Customer] = Operation("get_customer", "GET", True, 200, parse_customer)
TOKENIZE_CARD: Operation[str] = Operation("tokenize_card", "POST", False, 201, parse_token)
ASSOCIATE_CARD: Operation[CreditCard] = Operation("associate_card", "POST", False, 201, parse_credit_card)
GET_CARD: Operation[CreditCard] = Operation("get_card", "GET", True, 200, parse_credit_card)
CHARGE: Operation[Charge] = Operation("charge", "POST", False, 201, parse_charge, money="charge")
GET_CHARGE: Operation[Charge] = Operation("get_charge", "GET", True, 200, parse_charge)
REFUND: Operation[Charge] = Operation("refund", "POST", True, 202, parse_charge, money="refund")

ALL_OPERATIONS: tuple[Operation[Any], ...] = (
    CREATE_CUSTOMER,
    GET_CUSTOMER,
    TOKENIZE_CARD,
    ASSOCIATE_CARD,
    GET_CARD,
    CHARGE,
    GET_CHARGE,
    REFUND,
)
