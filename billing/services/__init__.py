"""Use cases. Each takes a `Context` (sessions, gateway, clock, policy) and runs its own transactions."""

from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound, ServiceError

__all__ = ["Context", "InvalidRequest", "NotFound", "ServiceError"]
