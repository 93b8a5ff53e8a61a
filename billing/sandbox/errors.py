"""Failures the emulator's state reports; the HTTP layer maps each to a status code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class FieldError:
    """One entry of Tpaga's 422 body."""

    entity: str  # Tpaga's "object": which kind of resource the request was about
    field: str
    rejected_value: object
    message: str

    def to_json(self) -> dict[str, object]:
        return {
            "object": self.entity,
            "field": self.field,
            "rejected-value": shown(self.rejected_value),
            "message": self.message,
        }


class ValidationFailed(Exception):
    """Raised when a request is invalid; answered with 422 and Tpaga's error list."""

    def __init__(self, *errors: FieldError) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors

    @classmethod
    def one(cls, obj: str, field: str, rejected_value: object, message: str) -> ValidationFailed:
        return cls(FieldError(obj, field, rejected_value, message))


class NotFound(Exception):
    """Raised when an id in the URL names nothing; answered with 404."""


def shown(value: object) -> str | None:
    """A rejected value as Tpaga shows it: a string (JSON text for containers), or null when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | Decimal):
        return str(value)
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
