"""The void window: 24 hours after approval, or until local midnight (same_day)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.refunds import RefundWindow, is_refundable, refund_deadline

BOGOTA = ZoneInfo("America/Bogota")


def bogota(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=BOGOTA)


@pytest.mark.parametrize(
    ("approved_at", "window", "deadline"),
    [
        (bogota(2026, 3, 3, 10, 0), RefundWindow.H24, bogota(2026, 3, 4, 10, 0)),
        (bogota(2026, 3, 3, 23, 30), RefundWindow.H24, bogota(2026, 3, 4, 23, 30)),
        (bogota(2026, 2, 28, 12, 0), "24h", bogota(2026, 3, 1, 12, 0)),
        (bogota(2026, 3, 3, 10, 0), RefundWindow.SAME_DAY, bogota(2026, 3, 4)),
        (bogota(2026, 3, 3, 23, 30), RefundWindow.SAME_DAY, bogota(2026, 3, 4)),
        (bogota(2026, 3, 3, 0, 0), RefundWindow.SAME_DAY, bogota(2026, 3, 4)),
        (bogota(2026, 12, 31, 18, 0), "same_day", bogota(2027, 1, 1)),
        (bogota(2028, 2, 28, 18, 0), "same_day", bogota(2028, 2, 29)),
    ],
)
def test_the_refund_deadline_follows_the_window(approved_at: datetime, window: str, deadline: datetime) -> None:
    result = refund_deadline(approved_at, window)
    assert result == deadline
    assert result.tzinfo is UTC


def test_a_same_day_window_uses_the_bogota_date_not_the_utc_date() -> None:
    # 23:30 in Bogota on March 3 is already 04:30 UTC on March 4
    approved_at = datetime(2026, 3, 4, 4, 30, tzinfo=UTC)
    assert refund_deadline(approved_at, RefundWindow.SAME_DAY) == datetime(2026, 3, 4, 5, 0, tzinfo=UTC)
    assert is_refundable(approved_at, approved_at + timedelta(minutes=29), RefundWindow.SAME_DAY)
    assert not is_refundable(approved_at, approved_at + timedelta(minutes=30), RefundWindow.SAME_DAY)
    # the 24h window keeps it refundable until the next evening
    assert is_refundable(approved_at, approved_at + timedelta(hours=23, minutes=59), RefundWindow.H24)


def test_a_same_day_deadline_in_another_zone_is_that_zones_midnight() -> None:
    approved_at = datetime(2026, 3, 3, 20, 0, tzinfo=UTC)
    assert refund_deadline(approved_at, "same_day", tz="UTC") == datetime(2026, 3, 4, tzinfo=UTC)
    assert refund_deadline(approved_at, "same_day", tz="Asia/Tokyo") == datetime(2026, 3, 4, 15, 0, tzinfo=UTC)


def test_a_same_day_deadline_on_a_day_whose_midnight_is_skipped_is_when_the_next_day_begins() -> None:
    # Chile sprang forward from 00:00 to 01:00 on 2022-09-11
    santiago = ZoneInfo("America/Santiago")
    deadline = refund_deadline(datetime(2022, 9, 10, 15, 0, tzinfo=santiago), "same_day", tz="America/Santiago")
    assert deadline == datetime(2022, 9, 11, 4, 0, tzinfo=UTC)
    assert deadline.astimezone(santiago) == datetime(2022, 9, 11, 1, 0, tzinfo=santiago)


@pytest.mark.parametrize(
    ("offset", "refundable"),
    [
        (timedelta(0), True),
        (timedelta(hours=23, minutes=59, seconds=59), True),
        (timedelta(hours=24), False),
        (timedelta(days=3), False),
    ],
)
def test_a_charge_is_refundable_until_exactly_24_hours_after_approval(offset: timedelta, refundable: bool) -> None:
    approved_at = bogota(2026, 3, 3, 10, 0)
    assert is_refundable(approved_at, approved_at + offset, RefundWindow.H24) is refundable


@pytest.mark.parametrize(
    ("now", "refundable"),
    [
        (bogota(2026, 3, 3, 23, 30), True),
        (bogota(2026, 3, 3, 23, 59, 59), True),
        (bogota(2026, 3, 4, 0, 0), False),
        (bogota(2026, 3, 4, 0, 1), False),
    ],
)
def test_a_charge_approved_at_23_30_in_bogota_is_refundable_same_day_only_until_midnight(
    now: datetime, refundable: bool
) -> None:
    assert is_refundable(bogota(2026, 3, 3, 23, 30), now, RefundWindow.SAME_DAY) is refundable


NAIVE = datetime(2026, 3, 3, 10, 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: refund_deadline(NAIVE, "24h"), "approved_at must be timezone-aware"),
        (lambda: refund_deadline(bogota(2026, 3, 3), "48h"), "unknown refund window '48h'"),
        (lambda: refund_deadline(bogota(2026, 3, 3), "same_day", tz="Nowhere/Special"), "unknown time zone"),
        (lambda: is_refundable(bogota(2026, 3, 3), NAIVE, "24h"), "now must be timezone-aware"),
    ],
)
def test_bad_arguments_raise_a_precise_value_error(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


approvals = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


@given(approved_at=approvals)
def test_a_same_day_deadline_is_the_first_bogota_midnight_after_approval(approved_at: datetime) -> None:
    deadline = refund_deadline(approved_at, RefundWindow.SAME_DAY)
    local = deadline.astimezone(BOGOTA)
    assert (local.hour, local.minute, local.second, local.microsecond) == (0, 0, 0, 0)
    assert approved_at < deadline <= approved_at + timedelta(hours=24)
    assert local.date() == approved_at.astimezone(BOGOTA).date() + timedelta(days=1)


@given(approved_at=approvals, window=st.sampled_from(list(RefundWindow)))
def test_refundability_is_exactly_now_before_the_deadline(approved_at: datetime, window: RefundWindow) -> None:
    deadline = refund_deadline(approved_at, window)
    assert is_refundable(approved_at, approved_at, window)
    assert is_refundable(approved_at, deadline - timedelta(microseconds=1), window)
    assert not is_refundable(approved_at, deadline, window)
