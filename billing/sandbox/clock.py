"""The emulator's own clock: wall time plus an offset that tests move forward through /__sandbox/clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

BOGOTA = ZoneInfo("America/Bogota")


class ClockError(ValueError):
    """Raised when asked to move the clock backwards or to a naive time."""


class SandboxClock:
    """Wall time plus a non-negative offset; it never goes backwards except on reset."""

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> datetime:
        if seconds < 0:
            raise ClockError("advanceSeconds must not be negative: the clock never goes backwards")
        self._offset += timedelta(seconds=seconds)
        return self.now()

    def set(self, when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ClockError("now must carry a UTC offset, e.g. 2026-01-01T12:00:00+00:00")
        current = self.now()
        if when < current:
            raise ClockError(f"now must not be before the current time {iso(current)}")
        self._offset += when - current
        return self.now()

    def reset(self) -> None:
        self._offset = timedelta(0)


def iso(moment: datetime) -> str:
    """ISO 8601 in Colombian local time, as a Colombian gateway would write it; clients must honour the offset."""
    return moment.astimezone(BOGOTA).isoformat(timespec="milliseconds")


def same_bogota_day(a: datetime, b: datetime) -> bool:
    return a.astimezone(BOGOTA).date() == b.astimezone(BOGOTA).date()
