"""Billing periods: anchored, clamped to month ends, tiling time, and caught up after downtime."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain import periods
from billing.domain.periods import (
    Interval,
    Period,
    due_period_indexes,
    period_at,
    period_boundary,
    period_index_at,
    trial_end,
)

BOGOTA = ZoneInfo("America/Bogota")
NEW_YORK = ZoneInfo("America/New_York")


def bogota(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, microsecond: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=BOGOTA)


def local_boundaries(anchor: datetime, n: int, interval: Interval, count: int, tz: str = "America/Bogota") -> list[str]:
    zone = ZoneInfo(tz)
    return [
        period_boundary(anchor, k, interval, count, tz).astimezone(zone).strftime("%Y-%m-%d %H:%M") for k in range(n)
    ]


# --- table tests -------------------------------------------------------------------------------


def test_a_jan_31_monthly_anchor_clamps_to_feb_29_in_a_leap_year_and_returns_to_the_31st() -> None:
    assert local_boundaries(bogota(2024, 1, 31, 9, 30), 7, Interval.MONTH, 1) == [
        "2024-01-31 09:30",
        "2024-02-29 09:30",
        "2024-03-31 09:30",
        "2024-04-30 09:30",
        "2024-05-31 09:30",
        "2024-06-30 09:30",
        "2024-07-31 09:30",
    ]


def test_a_jan_31_monthly_anchor_clamps_to_feb_28_in_a_common_year() -> None:
    assert local_boundaries(bogota(2025, 1, 31, 0, 0), 4, Interval.MONTH, 1) == [
        "2025-01-31 00:00",
        "2025-02-28 00:00",
        "2025-03-31 00:00",
        "2025-04-30 00:00",
    ]


def test_a_monthly_anchor_crosses_the_year_end() -> None:
    assert local_boundaries(bogota(2024, 11, 30, 8, 0), 4, Interval.MONTH, 1) == [
        "2024-11-30 08:00",
        "2024-12-30 08:00",
        "2025-01-30 08:00",
        "2025-02-28 08:00",
    ]


def test_a_feb_29_yearly_anchor_falls_on_feb_28_in_common_years_and_feb_29_in_leap_years() -> None:
    assert local_boundaries(bogota(2024, 2, 29, 12, 0), 6, Interval.YEAR, 1) == [
        "2024-02-29 12:00",
        "2025-02-28 12:00",
        "2026-02-28 12:00",
        "2027-02-28 12:00",
        "2028-02-29 12:00",
        "2029-02-28 12:00",
    ]


def test_a_biennial_feb_29_anchor_counts_years_from_the_anchor() -> None:
    assert local_boundaries(bogota(2024, 2, 29, 12, 0), 3, Interval.YEAR, 2) == [
        "2024-02-29 12:00",
        "2026-02-28 12:00",
        "2028-02-29 12:00",
    ]


def test_a_quarterly_plan_is_three_months_per_period_with_clamping() -> None:
    assert local_boundaries(bogota(2023, 11, 30, 6, 15), 5, Interval.MONTH, 3) == [
        "2023-11-30 06:15",
        "2024-02-29 06:15",
        "2024-05-30 06:15",
        "2024-08-30 06:15",
        "2024-11-30 06:15",
    ]


def test_a_fortnightly_plan_is_every_second_week() -> None:
    assert local_boundaries(bogota(2024, 2, 20, 10, 0), 4, Interval.WEEK, 2) == [
        "2024-02-20 10:00",
        "2024-03-05 10:00",
        "2024-03-19 10:00",
        "2024-04-02 10:00",
    ]


def test_a_daily_plan_with_a_count_steps_that_many_days() -> None:
    assert local_boundaries(bogota(2024, 2, 27, 23, 59), 4, Interval.DAY, 3) == [
        "2024-02-27 23:59",
        "2024-03-01 23:59",
        "2024-03-04 23:59",
        "2024-03-07 23:59",
    ]


def test_boundaries_follow_the_local_calendar_not_the_utc_one() -> None:
    # 03:00 UTC on Feb 1 is still Jan 31 in Bogota, so the anchor day is the 31st
    anchor = datetime(2024, 2, 1, 3, 0, tzinfo=UTC)
    assert period_boundary(anchor, 1, Interval.MONTH, 1) == datetime(2024, 3, 1, 3, 0, tzinfo=UTC)
    assert period_boundary(anchor, 2, Interval.MONTH, 1) == datetime(2024, 4, 1, 3, 0, tzinfo=UTC)
    assert period_boundary(anchor, 1, Interval.MONTH, 1, tz="UTC") == datetime(2024, 3, 1, 3, 0, tzinfo=UTC)


def test_boundary_zero_is_the_anchor_and_every_boundary_is_aware_utc() -> None:
    anchor = bogota(2024, 1, 31, 9, 30, 15, 123456)
    assert period_boundary(anchor, 0, Interval.MONTH, 1) == anchor
    for k in range(3):
        assert period_boundary(anchor, k, Interval.MONTH, 1).tzinfo is UTC


def test_string_intervals_are_accepted() -> None:
    anchor = bogota(2024, 1, 31)
    assert period_boundary(anchor, 1, "month", 1) == period_boundary(anchor, 1, Interval.MONTH, 1)


def test_a_daily_plan_keeps_its_wall_time_across_a_dst_change() -> None:
    # New York springs forward on 2024-03-10: that day is 23 hours long
    assert local_boundaries(datetime(2024, 3, 9, 9, 0, tzinfo=NEW_YORK), 3, Interval.DAY, 1, "America/New_York") == [
        "2024-03-09 09:00",
        "2024-03-10 09:00",
        "2024-03-11 09:00",
    ]
    period = period_at(datetime(2024, 3, 9, 9, 0, tzinfo=NEW_YORK), 0, Interval.DAY, 1, "America/New_York")
    assert period.end - period.start == timedelta(hours=23)


def test_an_anchor_in_the_repeated_dst_hour_is_its_own_boundary_zero() -> None:
    second_half_thirty = datetime(2024, 11, 3, 1, 30, tzinfo=NEW_YORK, fold=1)  # 06:30 UTC, EST
    # (compared in UTC: PEP 495 makes a fold=1 time unequal to every instant of another zone)
    assert period_boundary(second_half_thirty, 0, Interval.MONTH, 1, "America/New_York") == datetime(
        2024, 11, 3, 6, 30, tzinfo=UTC
    )
    assert period_boundary(second_half_thirty, 1, Interval.MONTH, 1, "America/New_York") == datetime(
        2024, 12, 3, 6, 30, tzinfo=UTC
    )


def test_period_at_is_the_half_open_span_between_two_boundaries() -> None:
    anchor = bogota(2024, 1, 31)
    assert period_at(anchor, 1, Interval.MONTH, 1) == Period(
        index=1,
        start=datetime(2024, 2, 29, 5, 0, tzinfo=UTC),
        end=datetime(2024, 3, 31, 5, 0, tzinfo=UTC),
    )


def test_a_period_contains_its_start_but_not_its_end() -> None:
    period = period_at(bogota(2024, 1, 31), 0, Interval.MONTH, 1)
    assert period.contains(period.start)
    assert period.contains(period.end - timedelta(microseconds=1))
    assert not period.contains(period.end)


def test_a_period_must_end_after_it_starts() -> None:
    when = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="end after it starts"):
        Period(index=0, start=when, end=when)


@pytest.mark.parametrize(
    ("when", "index"),
    [
        (bogota(2024, 1, 31, 9, 29, 59), -1),
        (bogota(2024, 1, 31, 9, 30), 0),
        (bogota(2024, 2, 29, 9, 29, 59), 0),
        (bogota(2024, 2, 29, 9, 30), 1),
        (bogota(2024, 3, 1, 0, 0), 1),
        (bogota(2024, 3, 31, 9, 30), 2),
        (bogota(2025, 2, 28, 9, 30), 13),
        (bogota(2025, 3, 30, 23, 0), 13),
    ],
)
def test_period_index_at_finds_the_period_containing_an_instant(when: datetime, index: int) -> None:
    assert period_index_at(bogota(2024, 1, 31, 9, 30), when, Interval.MONTH, 1) == index


def test_period_index_at_does_not_walk_every_period_since_the_anchor(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = periods.period_boundary

    def counting(*args: object, **kwargs: object) -> datetime:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(periods, "period_boundary", counting)
    anchor = bogota(1900, 1, 31, 9, 30)
    for interval in Interval:
        calls = 0
        when = bogota(2900, 6, 15)
        index = periods.period_index_at(anchor, when, interval, 1)
        assert real(anchor, index, interval, 1) <= when < real(anchor, index + 1, interval, 1)
        assert calls <= 4, f"{interval}: {calls} boundary computations"


def test_a_subscription_that_was_down_for_three_periods_gets_every_missed_period() -> None:
    anchor = bogota(2024, 1, 31, 9, 30)
    now = bogota(2024, 5, 2)
    assert due_period_indexes(anchor, 1, now, Interval.MONTH, 1) == [1, 2, 3]


def test_a_period_is_due_at_the_exact_instant_it_starts() -> None:
    anchor = bogota(2024, 1, 31, 9, 30)
    assert due_period_indexes(anchor, 1, bogota(2024, 2, 29, 9, 29, 59), Interval.MONTH, 1) == []
    assert due_period_indexes(anchor, 1, bogota(2024, 2, 29, 9, 30), Interval.MONTH, 1) == [1]


def test_the_first_period_is_due_at_the_anchor_and_nothing_is_due_before_it() -> None:
    anchor = bogota(2024, 1, 31, 9, 30)
    assert due_period_indexes(anchor, 0, anchor, Interval.MONTH, 1) == [0]
    assert due_period_indexes(anchor, 0, anchor - timedelta(seconds=1), Interval.MONTH, 1) == []


def test_catch_up_with_a_limit_returns_the_oldest_periods_first() -> None:
    anchor = bogota(2024, 1, 1)
    now = bogota(2024, 12, 15)
    assert due_period_indexes(anchor, 3, now, Interval.MONTH, 1, limit=4) == [3, 4, 5, 6]
    assert due_period_indexes(anchor, 7, now, Interval.MONTH, 1, limit=4) == [7, 8, 9, 10]
    assert due_period_indexes(anchor, 11, now, Interval.MONTH, 1, limit=4) == [11]
    assert due_period_indexes(anchor, 12, now, Interval.MONTH, 1, limit=4) == []
    assert due_period_indexes(anchor, 3, now, Interval.MONTH, 1, limit=0) == []


@pytest.mark.parametrize(
    ("trial_days", "expected_local"),
    [
        (0, "2024-01-31 09:30"),
        (1, "2024-02-01 09:30"),
        (14, "2024-02-14 09:30"),
        (30, "2024-03-01 09:30"),
        (366, "2025-01-31 09:30"),
    ],
)
def test_a_trial_ends_that_many_local_days_after_it_starts(trial_days: int, expected_local: str) -> None:
    end = trial_end(bogota(2024, 1, 31, 9, 30), trial_days)
    assert end.tzinfo is UTC
    assert end.astimezone(BOGOTA).strftime("%Y-%m-%d %H:%M") == expected_local


def test_no_trial_ends_at_the_start() -> None:
    start = datetime(2024, 1, 31, 14, 30, tzinfo=UTC)
    assert trial_end(start, 0) == start


ANCHOR = bogota(2024, 1, 31)
NAIVE = datetime(2024, 1, 31)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: period_boundary(NAIVE, 0, Interval.MONTH, 1), "anchor must be timezone-aware"),
        (lambda: period_boundary(ANCHOR, 0, "fortnight", 1), "unknown interval 'fortnight'"),
        (lambda: period_boundary(ANCHOR, 0, Interval.MONTH, 0), "count must be >= 1, got 0"),
        (lambda: period_boundary(ANCHOR, 0, Interval.MONTH, -2), "count must be >= 1, got -2"),
        (lambda: period_boundary(ANCHOR, 0, Interval.MONTH, True), "count must be an int"),
        (lambda: period_boundary(ANCHOR, 0, Interval.MONTH, 1.0), "count must be an int"),  # type: ignore[arg-type]
        (lambda: period_boundary(ANCHOR, -1, Interval.MONTH, 1), "k must be >= 0, got -1"),
        (lambda: period_boundary(ANCHOR, 1, Interval.MONTH, 1, tz="Mars/Olympus"), "unknown time zone"),
        (lambda: period_boundary(ANCHOR, 10**6, Interval.YEAR, 1), "out of range"),
        (lambda: period_at(ANCHOR, -1, Interval.MONTH, 1), "index must be >= 0"),
        (lambda: period_index_at(ANCHOR, NAIVE, Interval.MONTH, 1), "when must be timezone-aware"),
        (lambda: period_index_at(NAIVE, ANCHOR, Interval.MONTH, 1), "anchor must be timezone-aware"),
        (lambda: period_index_at(ANCHOR, ANCHOR, "hour", 1), "unknown interval 'hour'"),
        (lambda: due_period_indexes(ANCHOR, -1, ANCHOR, Interval.MONTH, 1), "next_index must be >= 0"),
        (lambda: due_period_indexes(ANCHOR, 0, ANCHOR, Interval.MONTH, 1, limit=-1), "limit must be >= 0"),
        (lambda: due_period_indexes(ANCHOR, 0, NAIVE, Interval.MONTH, 1), "now must be timezone-aware"),
        (lambda: trial_end(NAIVE, 3), "start must be timezone-aware"),
        (lambda: trial_end(ANCHOR, -1), "trial_days must be >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_a_precise_value_error(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


# --- property tests ----------------------------------------------------------------------------

# Zones with and without DST; zones with whole skipped days (Pacific/Apia, 2011) are not supported.
ZONES = [
    "America/Bogota",
    "UTC",
    "America/New_York",
    "Europe/London",
    "America/Santiago",
    "Australia/Lord_Howe",
]

intervals = st.sampled_from(list(Interval))
counts = st.integers(min_value=1, max_value=4)
indexes = st.integers(min_value=0, max_value=150)


@st.composite
def anchors_in(draw: st.DrawFn, zones: list[str]) -> tuple[datetime, str]:
    tz = draw(st.sampled_from(zones))
    anchor = draw(
        st.datetimes(
            min_value=datetime(2000, 1, 1),
            max_value=datetime(2100, 1, 1),
            timezones=st.just(ZoneInfo(tz)),
            allow_imaginary=False,
        )
    )
    return anchor, tz


@given(anchored=anchors_in(ZONES), interval=intervals, count=counts, k=indexes)
def test_consecutive_periods_tile_time_with_no_gap_and_no_overlap(
    anchored: tuple[datetime, str], interval: Interval, count: int, k: int
) -> None:
    anchor, tz = anchored
    this, following = period_at(anchor, k, interval, count, tz), period_at(anchor, k + 1, interval, count, tz)
    assert this.start < this.end
    assert this.end == following.start


@given(anchored=anchors_in(["America/Bogota", "UTC"]), count=counts, k=indexes)
def test_a_monthly_anchor_never_drifts(anchored: tuple[datetime, str], count: int, k: int) -> None:
    anchor, tz = anchored
    zone = ZoneInfo(tz)
    local_anchor = anchor.astimezone(zone)
    boundary = period_boundary(anchor, k, Interval.MONTH, count, tz).astimezone(zone)
    months = local_anchor.month - 1 + k * count
    assert (boundary.year, boundary.month) == (local_anchor.year + months // 12, months % 12 + 1)
    assert boundary.day == min(local_anchor.day, calendar.monthrange(boundary.year, boundary.month)[1])
    assert boundary.time() == local_anchor.time()


@given(anchored=anchors_in(["America/Bogota", "UTC"]), count=counts, k=indexes)
def test_a_yearly_anchor_never_drifts(anchored: tuple[datetime, str], count: int, k: int) -> None:
    anchor, tz = anchored
    zone = ZoneInfo(tz)
    local_anchor = anchor.astimezone(zone)
    boundary = period_boundary(anchor, k, Interval.YEAR, count, tz).astimezone(zone)
    assert (boundary.year, boundary.month) == (local_anchor.year + k * count, local_anchor.month)
    assert boundary.day == min(local_anchor.day, calendar.monthrange(boundary.year, boundary.month)[1])
    assert boundary.time() == local_anchor.time()


@given(anchored=anchors_in(["America/Bogota", "UTC"]), interval=st.sampled_from([Interval.DAY, Interval.WEEK]))
def test_daily_and_weekly_boundaries_keep_the_wall_time(anchored: tuple[datetime, str], interval: Interval) -> None:
    anchor, tz = anchored
    zone = ZoneInfo(tz)
    for k in (1, 2, 7, 365):
        boundary = period_boundary(anchor, k, interval, 1, tz).astimezone(zone)
        assert boundary.time() == anchor.astimezone(zone).time()
        step = 1 if interval is Interval.DAY else 7
        assert (boundary.date() - anchor.astimezone(zone).date()).days == k * step


@given(
    anchored=anchors_in(ZONES),
    interval=intervals,
    count=counts,
    k=indexes,
    offset=st.integers(min_value=0, max_value=2**62),
)
def test_period_index_at_inverts_period_at_for_any_instant_inside(
    anchored: tuple[datetime, str], interval: Interval, count: int, k: int, offset: int
) -> None:
    anchor, tz = anchored
    period = period_at(anchor, k, interval, count, tz)
    length = (period.end - period.start) // timedelta(microseconds=1)
    inside = period.start + timedelta(microseconds=offset % length)
    assert period.contains(inside)
    assert period_index_at(anchor, period.start, interval, count, tz) == k
    assert period_index_at(anchor, inside, interval, count, tz) == k
    assert period_index_at(anchor, period.end - timedelta(microseconds=1), interval, count, tz) == k
    assert period_index_at(anchor, period.end, interval, count, tz) == k + 1


@given(
    anchored=anchors_in(ZONES),
    interval=intervals,
    count=counts,
    steps=st.lists(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400)), max_size=12),
    limit=st.one_of(st.none(), st.integers(min_value=1, max_value=5)),
)
def test_catching_up_never_skips_or_duplicates_a_period(
    anchored: tuple[datetime, str],
    interval: Interval,
    count: int,
    steps: list[timedelta],
    limit: int | None,
) -> None:
    anchor, tz = anchored
    now = anchor - timedelta(days=3)
    next_index = 0
    opened: list[int] = []
    for step in steps:
        now += step
        due = due_period_indexes(anchor, next_index, now, interval, count, tz, limit=limit)
        assert limit is None or len(due) <= limit
        for index in due:
            assert period_at(anchor, index, interval, count, tz).start <= now
        opened += due
        if due:
            next_index = due[-1] + 1
    # drain what the limit held back, without moving the clock
    while due := due_period_indexes(anchor, next_index, now, interval, count, tz, limit=limit):
        opened += due
        next_index = due[-1] + 1
    assert opened == list(range(period_index_at(anchor, now, interval, count, tz) + 1))


@pytest.mark.parametrize(
    ("interval", "count", "share"),
    [
        ("month", 1, (1, 1)),
        ("month", 3, (1, 3)),
        ("year", 1, (1, 12)),
        ("year", 2, (1, 24)),
        ("week", 1, (52, 12)),
        ("week", 2, (26, 12)),
        ("day", 1, (365, 12)),
        ("day", 30, (365, 360)),
    ],
)
def test_monthly_share_is_a_twelfth_of_a_year_of_periods(interval: str, count: int, share: tuple[int, int]) -> None:
    from fractions import Fraction

    assert periods.monthly_share(interval, count) == Fraction(*share)


def test_monthly_share_refuses_bad_terms() -> None:
    with pytest.raises(ValueError, match="unknown interval"):
        periods.monthly_share("fortnight", 1)
    with pytest.raises(ValueError, match="count must be >= 1"):
        periods.monthly_share("month", 0)
