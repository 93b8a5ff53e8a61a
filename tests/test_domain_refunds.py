"""The void window: 24 hours after approval, or until local midnight (same_day)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.refunds import RefundWindow, is_refundable, refund_deadline, window_end

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


MARGIN = timedelta(minutes=5)


@pytest.mark.parametrize(
    ("approved_at", "window", "deadline"),
    [
        # 24h: the margin comes off the deadline (the same as taking it off the approval time)
        (bogota(2026, 3, 3, 10, 0), "24h", bogota(2026, 3, 4, 9, 55)),
        (bogota(2026, 3, 4, 0, 1), "24h", bogota(2026, 3, 4, 23, 56)),
        # same_day inside the day: the margin leaves the void room to arrive before midnight
        (bogota(2026, 3, 3, 10, 0), "same_day", bogota(2026, 3, 3, 23, 55)),
        (bogota(2026, 3, 3, 23, 54), "same_day", bogota(2026, 3, 3, 23, 55)),
        # recorded late in the evening: the deadline is already behind it (refunds are expired at once)
        (bogota(2026, 3, 3, 23, 57), "same_day", bogota(2026, 3, 3, 23, 55)),
        # recorded within the margin after midnight: Tpaga may have approved it the day before, whose
        # window closed at that midnight (the old rule gave 23:55 of the next day here)
        (bogota(2026, 3, 4, 0, 0), "same_day", bogota(2026, 3, 4)),
        (bogota(2026, 3, 4, 0, 1), "same_day", bogota(2026, 3, 4)),
        (bogota(2026, 3, 4, 0, 4, 59), "same_day", bogota(2026, 3, 4)),
        # past the margin: the approval is surely today's
        (bogota(2026, 3, 4, 0, 5), "same_day", bogota(2026, 3, 4, 23, 55)),
    ],
)
def test_the_safety_margin_keeps_the_deadline_inside_tpagas_window(
    approved_at: datetime, window: str, deadline: datetime
) -> None:
    assert refund_deadline(approved_at, window, MARGIN) == deadline


margins = st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=2))


@given(
    day=st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)),
    after_midnight=st.timedeltas(min_value=timedelta(hours=-3), max_value=timedelta(hours=3)),
    lag=st.floats(min_value=0, max_value=1),
    margin=margins,
    window=st.sampled_from(list(RefundWindow)),
)
def test_the_deadline_is_never_later_than_tpagas_for_any_approval_within_the_margin(
    day: date, after_midnight: timedelta, lag: float, margin: timedelta, window: RefundWindow
) -> None:
    # Recorded near a Bogota midnight, where the same-day rule is decided; Tpaga approved at most `margin`
    # before we recorded the approval.
    approved_at = datetime(day.year, day.month, day.day, tzinfo=BOGOTA) + after_midnight
    tpaga_approved_at = approved_at - margin * lag
    deadline = refund_deadline(approved_at, window, margin)
    assert deadline <= window_end(tpaga_approved_at, window)
    assert deadline <= window_end(approved_at, window) - margin


NAIVE = datetime(2026, 3, 3, 10, 0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: refund_deadline(NAIVE, "24h"), "approved_at must be timezone-aware"),
        (lambda: refund_deadline(bogota(2026, 3, 3), "48h"), "unknown refund window '48h'"),
        (lambda: refund_deadline(bogota(2026, 3, 3), "24h", timedelta(minutes=-1)), "margin must be a non-negative"),
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
