"""Errors a caller of the services can get: bad input that changed nothing."""

from __future__ import annotations

from collections.abc import Callable


class ServiceError(Exception):
    """Raised when a use case refuses its input; nothing was changed."""


class NotFound(ServiceError):
    """Raised when an id names nothing."""


class InvalidRequest(ServiceError):
    """Raised when the request is well-formed but not allowed in the current state."""


class Waiting(ServiceError):
    """Raised when a command names an object that is not there yet (its creating command has not arrived) or is
    being created at Tpaga by another worker: retry later; nothing was changed.

    `give_up(reason)` records the command's refusal once its caller stops waiting (set by the ledger).
    """

    give_up: Callable[[str], None] | None = None


class Missing(Waiting):
    """Raised when a command names a customer or subscription by an external id that does not exist (yet)."""

    def __init__(self, kind: str, external_id: str) -> None:
        super().__init__(f"{kind} {external_id!r} does not exist (yet)")
        self.kind = kind
        self.external_id = external_id


class Stale(InvalidRequest):
    """Raised when a command's `issued_at` is older than the last change applied to its object."""


class AnswerLost(ServiceError):
    """Raised when Tpaga's answer to a call that cannot be repeated (a single-use token) was lost."""
