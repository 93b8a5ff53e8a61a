"""JSON request bodies with exact money: a Decimal becomes a JSON number written digit for digit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from json.encoder import encode_basestring

JsonValue = str | int | bool | Decimal | None | Mapping[str, "JsonValue"] | Sequence["JsonValue"]


def decimal_literal(value: Decimal) -> str:
    """A finite Decimal as a JSON number: "4500" when whole, else plain digits ("4500.50"), never exponent."""
    if not value.is_finite():
        raise ValueError("money must be a finite decimal")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


def _encode(value: JsonValue) -> str:
    # encode_basestring is json's own string encoder for ensure_ascii=False (C when available): one call per
    # string, where json.dumps(..., ensure_ascii=False) would build a JSONEncoder for each one.
    if isinstance(value, str):
        return encode_basestring(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Decimal):
        return decimal_literal(value)
    if isinstance(value, int):
        return int.__repr__(value)  # an IntEnum as its number, as json.dumps writes it
    if isinstance(value, float):
        raise TypeError("floats are not allowed in request bodies; use Decimal or int")
    if isinstance(value, Mapping):
        return "{" + ",".join([f"{encode_basestring(str(k))}:{_encode(v)}" for k, v in value.items()]) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join([_encode(v) for v in value]) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_json(payload: Mapping[str, JsonValue]) -> bytes:
    """The UTF-8 JSON body for a payload of str, int, bool, None, Decimal, mappings and sequences."""
    return _encode(payload).encode("utf-8")
