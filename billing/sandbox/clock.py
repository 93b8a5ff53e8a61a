"""The emulator's own clock: wall time plus an offset that tests move forward through /__sandbox/clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

BOGOTA = ZoneInfo("America/Bogota")
# A sane window for test scenarios. Beyond it the emulator would still answer, but every test card has expired
# (each charge a 54) and date arithmetic near year 9999 overflows; refusing the move is clearer than either.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 12, 31, 23, 59, 59, tzinfo=UTC)
_RANGE = "between 2000-01-01T00:00:00+00:00 and 2200-12-31T23:59:59+00:00"


class ClockError(ValueError):
    """Raised when asked to move the clock backwards, to a naive time, or out of the EARLIEST..LATEST window."""


class SandboxClock:
    """Wall time plus a non-negative offset; it never goes backwards except on reset."""

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> datetime:
        # `seconds` may be an int too large for a float, so it is compared before any conversion.
        if isinstance(seconds, float) and not math.isfinite(seconds):
            raise ClockError("advanceSeconds must be a finite number of seconds")
        if seconds < 0:
            raise ClockError("advanceSeconds must not be negative: the clock never goes backwards")
        room = (LATEST - self.now()).total_seconds()
        if seconds > room:
            most = max(0, math.floor(room))
            raise ClockError(f"advanceSeconds must be at most {most}: the clock stays {_RANGE}")
        self._offset += timedelta(seconds=float(seconds))
        return self.now()

    def set(self, when: datetime) -> datetime:
        if when.tzinfo is None:
            raise ClockError("now must carry a UTC offset, e.g. 2026-01-01T12:00:00+00:00")
        # Aware datetimes compare without converting, so even 9999-12-31T23:59-23:59 cannot overflow here.
        if not EARLIEST <= when <= LATEST:
            raise ClockError(f"now must be {_RANGE}")
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
