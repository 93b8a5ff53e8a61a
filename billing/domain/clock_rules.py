"""What every rule about time needs: aware datetimes only, and Colombia's zone."""

from __future__ import annotations

from datetime import datetime

# Tpaga's zone: the default for billing periods, and always the zone of its "same day" void window.
BOGOTA = "America/Bogota"


def require_aware(name: str, value: datetime) -> datetime:
    """`value` itself, when it is a timezone-aware datetime; a ValueError naming `name` otherwise."""
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value
