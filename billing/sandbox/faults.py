"""Fault injection for charge and refund requests: what goes wrong with the next answer, and its wire form."""

from __future__ import annotations

import random
from collections import deque
from decimal import Decimal
from typing import Any

from billing.sandbox.errors import FieldError, ValidationFailed

OK = "ok"
ERROR = "5xx"  # no charge made, a 502/504 answer
DROP = "drop"  # the charge is made, the connection is closed without an answer
GARBAGE = "garbage"  # the charge is made, the answer is unreadable
SLOW = "slow"  # the charge is made, the answer comes after slow_seconds
KINDS = (OK, ERROR, DROP, GARBAGE, SLOW)
DEFAULT_SLOW_SECONDS = 30.0
MAX_LATENCY_MS = 600_000

HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
JSON_504 = b'{"error":"Gateway Timeout","status":504}'


class FaultPlan:
    """Rates, deterministic queues and the seeded RNG that decide each charge's and refund's fault."""

    def __init__(
        self,
        *,
        latency_ms: int = 0,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        garbage_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._configured = {
            "latencyMs": latency_ms,
            "errorRate": error_rate,
            "dropRate": drop_rate,
            "garbageRate": garbage_rate,
        }
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        self.latency_ms = int(self._configured["latencyMs"])
        self.error_rate = float(self._configured["errorRate"])
        self.drop_rate = float(self._configured["dropRate"])
        self.garbage_rate = float(self._configured["garbageRate"])
        self.slow_seconds = DEFAULT_SLOW_SECONDS
        self.next_charges: deque[str] = deque()
        self.next_refunds: deque[str] = deque()
        self._rng = random.Random(self._seed)
        self._errors_sent = 0
        self._garbage_sent = 0

    @property
    def latency_seconds(self) -> float:
        return self.latency_ms / 1000.0

    def next_for_charge(self) -> str:
        return self.next_charges.popleft() if self.next_charges else self._draw()

    def next_for_refund(self) -> str:
        return self.next_refunds.popleft() if self.next_refunds else self._draw()

    def _draw(self) -> str:
        if not (self.error_rate or self.drop_rate or self.garbage_rate):
            return OK
        # One draw per request, split into bands, so a fixed seed replays the same sequence of faults.
        roll = self._rng.random()
        if roll < self.error_rate:
            return ERROR
        roll -= self.error_rate
        if roll < self.drop_rate:
            return DROP
        roll -= self.drop_rate
        return GARBAGE if roll < self.garbage_rate else OK

    def error_answer(self) -> tuple[int, bytes, str]:
        """Alternates Tpaga's two documented unknown-outcome statuses and body kinds."""
        self._errors_sent += 1
        if self._errors_sent % 2:
            return 502, HTML_502, "text/html"
        return 504, JSON_504, "application/json"

    def garbage_answer(self, status: int, real_body: bytes) -> tuple[int, bytes, str]:
        """Alternates a proxy's HTML error page and the real answer cut off mid-JSON."""
        self._garbage_sent += 1
        if self._garbage_sent % 2:
            return 502, HTML_502, "text/html"
        return status, real_body[: max(1, len(real_body) // 2)], "application/json"

    def to_json(self) -> dict[str, object]:
        return {
            "latencyMs": self.latency_ms,
            "errorRate": self.error_rate,
            "dropRate": self.drop_rate,
            "garbageRate": self.garbage_rate,
            "slowSeconds": self.slow_seconds,
            "nextCharges": list(self.next_charges),
            "nextRefunds": list(self.next_refunds),
        }

    def update(self, body: dict[str, Any]) -> None:
        """Applies a partial update; nothing changes unless every given field is valid."""
        errors: list[FieldError] = []
        latency = _number(body, "latencyMs", self.latency_ms, 0, MAX_LATENCY_MS, errors, whole=True)
        error_rate = _number(body, "errorRate", self.error_rate, 0, 1, errors)
        drop_rate = _number(body, "dropRate", self.drop_rate, 0, 1, errors)
        garbage_rate = _number(body, "garbageRate", self.garbage_rate, 0, 1, errors)
        slow_seconds = _number(body, "slowSeconds", self.slow_seconds, 0, 3600, errors)
        next_charges = _kinds(body, "nextCharges", self.next_charges, errors)
        next_refunds = _kinds(body, "nextRefunds", self.next_refunds, errors)
        if errors:
            raise ValidationFailed(*errors)
        self.latency_ms = int(latency)
        self.error_rate, self.drop_rate, self.garbage_rate = error_rate, drop_rate, garbage_rate
        self.slow_seconds = slow_seconds
        self.next_charges, self.next_refunds = next_charges, next_refunds


def _number(
    body: dict[str, Any],
    name: str,
    current: float,
    low: float,
    high: float,
    errors: list[FieldError],
    *,
    whole: bool = False,
) -> float:
    value = body.get(name, current)
    allowed = int if whole else (int, float, Decimal)
    if isinstance(value, bool) or not isinstance(value, allowed) or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        errors.append(FieldError("Faults", name, value, f"must be {kind} from {low:g} to {high:g}"))
        return current
    return float(value)


def _kinds(body: dict[str, Any], name: str, current: deque[str], errors: list[FieldError]) -> deque[str]:
    if name not in body:
        return current
    value = body[name]
    if not isinstance(value, list) or not all(isinstance(v, str) and v in KINDS for v in value):
        errors.append(FieldError("Faults", name, value, f"must be a list of {', '.join(KINDS)}"))
        return current
    return deque(value)
