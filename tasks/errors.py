"""What a task can fail with, and how each is treated by the worker."""

from __future__ import annotations


class TaskInputError(Exception):
    """Raised when a task's arguments are wrong or name nothing; it fails once and is never retried."""


class TransientError(Exception):
    """Raised when infrastructure blinked (database, gateway not reached); the task retries shortly."""


class DatabaseError(Exception):
    """Raised in place of a SQLAlchemy error, whose message would carry SQL parameters (ids, card ids)."""


class GatewayError(Exception):
    """Raised when Tpaga refused a call in a way a retry cannot fix; the message has no ids or tokens."""
