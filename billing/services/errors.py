"""Errors a caller of the services can get: bad input that changed nothing."""

from __future__ import annotations


class ServiceError(Exception):
    """Raised when a use case refuses its input; nothing was changed."""


class NotFound(ServiceError):
    """Raised when an id names nothing."""


class InvalidRequest(ServiceError):
    """Raised when the request is well-formed but not allowed in the current state."""
