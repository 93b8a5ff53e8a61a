"""JSON request bodies with exact money: a Decimal becomes a JSON number written digit for digit."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal

JsonValue = str | int | bool | Decimal | None | Mapping[str, "JsonValue"] | Sequence["JsonValue"]


def decimal_literal(value: Decimal) -> str:
    """A finite Decimal as a JSON number: "4500" when whole, else plain digits ("4500.50"), never exponent."""
    if not value.is_finite():
        raise ValueError("money must be a finite decimal")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


def _encode(value: JsonValue) -> str:
    if isinstance(value, Decimal):
        return decimal_literal(value)
    if isinstance(value, float):
        raise TypeError("floats are not allowed in request bodies; use Decimal or int")
    if value is None or isinstance(value, str | bool | int):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}:{_encode(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_json(payload: Mapping[str, JsonValue]) -> bytes:
    """The UTF-8 JSON body for a payload of str, int, bool, None, Decimal, mappings and sequences."""
    return _encode(payload).encode("utf-8")
