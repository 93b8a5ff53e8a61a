"""Counts and durations in text output read as a person writes them, not as Python's dict and timedelta print."""

from __future__ import annotations

from datetime import timedelta

import pytest

from billing.display import counts, duration


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (timedelta(days=7, hours=2, minutes=20, seconds=16.824180), "7 days 2 h 20 min"),
        (timedelta(days=1, minutes=5), "1 day 5 min"),
        (timedelta(days=31), "31 days"),
        (timedelta(hours=2), "2 h"),
        (timedelta(minutes=3, seconds=4.6), "3 min 5 s"),
        (timedelta(seconds=0.4), "0 s"),
        (timedelta(0), "0 s"),
        (timedelta(hours=1, seconds=31), "1 h 1 min"),  # past an hour, seconds are rounded into minutes
        (timedelta(hours=23, minutes=59, seconds=50), "1 day"),
        (timedelta(minutes=-90), "-1 h 30 min"),
        (5400.0, "1 h 30 min"),  # seconds as a number, as `clock show` has them
    ],
)
def test_a_duration_reads_in_whole_units_largest_first(value: timedelta | float, shown: str) -> None:
    assert duration(value) == shown


def test_counts_read_by_name_without_braces_or_zeros() -> None:
    assert counts({"paid": 9, "open": 5, "review": 0}) == "open 5, paid 9"
    assert counts({}) == "none"
    assert counts({"voided": 0}, empty="-") == "-"
