"""Values as a person reads them in the CLI's and the demo's text output (the `--json` forms keep raw values).

Python's own forms read as internals: `{'open': 5, 'paid': 9}` for counts, `7 days, 2:20:16.824180` for a
duration. These give `open 5, paid 9` and `7 days 2 h 20 min`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

_UNITS = (("day", 86_400), ("h", 3_600), ("min", 60), ("s", 1))


def duration(value: timedelta | float) -> str:
    """`7 days 2 h 20 min`, `1 day 5 min`, `45 s`: whole units, largest first, zero parts left out.

    Seconds are shown only under an hour (past that they are noise); a fraction of a second is rounded. A
    negative duration reads `-` and its size."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    sign = "-" if seconds < 0 else ""
    left = round(abs(seconds))
    if left >= 3_600:
        left = round(left / 60) * 60
    parts: list[str] = []
    for unit, size in _UNITS:
        amount, left = divmod(left, size)
        if amount:
            parts.append(f"{amount} {unit}{'s' if unit == 'day' and amount != 1 else ''}")
    return sign + (" ".join(parts) if parts else "0 s")


def counts(value: Mapping[str, int], *, empty: str = "none") -> str:
    """`open 5, paid 9`: a count per state, by name, zero counts left out; `empty` when nothing is left."""
    shown = [f"{key} {count}" for key, count in sorted(value.items()) if count]
    return ", ".join(shown) if shown else empty
