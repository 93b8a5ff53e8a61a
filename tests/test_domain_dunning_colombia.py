"""The colombia dunning policy: retries timed by decline reason, on Colombia's pay calendar, within its limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest

from billing.domain.declines import DeclineClass, SoftReason, soft_reason
from billing.domain.dunning import Action, ColombiaPolicy, DunningDecision, decide_after_decline
from billing.domain.paydays import paydays
from billing.domain.states import SubscriptionStatus

BOGOTA = ZoneInfo("America/Bogota")
POLICY = ColombiaPolicy()
MONDAY = datetime(2027, 1, 4, 10, 0, tzinfo=BOGOTA)


def decide(
    code: str,
    *,
    now: datetime,
    first: datetime | None = None,
    soft_failures: int = 1,
    previous: str | None = None,
    card_declines: int = 1,
    policy: ColombiaPolicy = POLICY,
) -> DunningDecision:
    return decide_after_decline(
        policy,
        DeclineClass.SOFT,
        first_failure_at=first or now,
        soft_failures=soft_failures,
        now=now,
        code=code,
        previous_code=previous,
        card_declines=card_declines,
    )


def test_the_defaults_are_the_issues() -> None:
    assert (POLICY.window_days, POLICY.payday_hour, POLICY.max_retries, POLICY.max_card_declines) == (21, 9, 8, 15)
    assert POLICY.card_period == timedelta(days=30) and POLICY.final_status is SubscriptionStatus.UNPAID


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("51", SoftReason.FUNDS),
        ("91", SoftReason.ISSUER),
        ("96", SoftReason.ISSUER),
        ("T8", SoftReason.ISSUER),
        ("05", SoftReason.OTHER),
        ("61", SoftReason.OTHER),
        ("7777", SoftReason.OTHER),
    ],
)
def test_soft_reasons_by_code(code: str, reason: SoftReason) -> None:
    assert soft_reason(code) is reason


def test_a_51_on_monday_2027_01_04_is_retried_on_friday_the_15th_at_nine_in_bogota() -> None:
    decision = decide("51", now=MONDAY)
    assert decision.action is Action.RETRY and decision.subscription_status is SubscriptionStatus.PAST_DUE
    assert decision.retry_at == datetime(2027, 1, 15, 14, 0, tzinfo=UTC)  # 09:00 in Bogota (UTC-5)


def test_every_51_retry_of_a_year_is_a_payday_window_business_day_at_least_a_day_later() -> None:
    co = holidays.Colombia(years=[2027, 2028])
    all_paydays = {p for y in (2027, 2028) for m in range(1, 13) for p in paydays(y, m)}
    for n in range(365):
        now = datetime(2027, 1, 1, 18, 0, tzinfo=BOGOTA) + timedelta(days=n)
        decision = decide("51", now=now)
        assert decision.retry_at is not None, now
        local = decision.retry_at.astimezone(BOGOTA)
        assert local.weekday() < 5 and local.date() not in co, (now, local)  # never a Sunday or a holiday
        assert decision.retry_at >= now + timedelta(days=1)
        assert local.hour == 9 or decision.retry_at == now + timedelta(days=1)  # the hour, or the gap's end
        # a payday, or the first business day after one that came on or after the decline's day
        back = local.date() - timedelta(days=1)
        while back.weekday() >= 5 or back in co:
            back -= timedelta(days=1)
        assert local.date() in all_paydays or (back in all_paydays and back >= now.date()), (now, local)
        # and the wait is never more than about half a month: no payday passed unused
        assert decision.retry_at - now <= timedelta(days=17), (now, local)


def test_a_51_the_evening_before_a_payday_is_retried_on_the_payday_but_never_within_a_day() -> None:
    thursday = datetime(2027, 1, 14, 20, 0, tzinfo=BOGOTA)  # Friday 15th 09:00 is only 13 hours away
    assert decide("51", now=thursday).retry_at == datetime(2027, 1, 15, 20, 0, tzinfo=BOGOTA)


def test_a_payday_retry_that_ran_late_is_retried_the_next_business_day_not_after_the_window() -> None:
    # Monday 15 February's retry ran at 09:05 and declined: Tuesday the 16th at 09:05 (a day later, still the
    # business day after the payday), not the next payday on the 26th
    first = datetime(2027, 2, 4, 10, 0, tzinfo=BOGOTA)
    late = datetime(2027, 2, 15, 9, 5, tzinfo=BOGOTA)
    decision = decide("51", now=late, first=first, soft_failures=2, previous="51")
    assert decision.retry_at == datetime(2027, 2, 16, 9, 5, tzinfo=BOGOTA)
    # from a Friday payday the weekend is skipped: Monday at the hour
    friday = decide("51", now=datetime(2027, 1, 15, 9, 5, tzinfo=BOGOTA), first=MONDAY, soft_failures=2)
    assert friday.retry_at == datetime(2027, 1, 18, 9, 0, tzinfo=BOGOTA)


def test_a_91_is_retried_within_hours_then_daily() -> None:
    first = decide("91", now=MONDAY)
    assert first.retry_at == MONDAY + timedelta(hours=2)
    again = decide("91", now=MONDAY + timedelta(hours=2), first=MONDAY, soft_failures=2, previous="91")
    assert again.retry_at == MONDAY + timedelta(hours=2, days=1)
    # an issuer outage during a payday retry of a 51 is retried within hours too
    after_51 = decide("96", now=MONDAY + timedelta(days=11), first=MONDAY, soft_failures=2, previous="51")
    assert after_51.retry_at == MONDAY + timedelta(days=11, hours=2)


def test_other_soft_declines_follow_the_spaced_schedule_from_the_first_failure() -> None:
    retries = []
    now = MONDAY
    for soft_failures in range(1, 9):
        decision = decide("05", now=now, first=MONDAY, soft_failures=soft_failures)
        if decision.action is not Action.RETRY:
            break
        assert decision.retry_at is not None
        retries.append((decision.retry_at - MONDAY) / timedelta(days=1))
        now = decision.retry_at
    assert retries == [1, 3, 5, 8, 12, 16, 21]
    assert decision.action is Action.UNCOLLECTIBLE


@pytest.mark.parametrize("code", ["51", "91", "05"])
def test_no_retry_beyond_the_window(code: str) -> None:
    first = datetime(2027, 1, 1, 10, 0, tzinfo=BOGOTA)
    late = first + timedelta(days=20, hours=23)  # a retry would fall after day 21
    decision = decide(code, now=late, first=first, soft_failures=2, previous=code)
    assert decision == DunningDecision(Action.UNCOLLECTIBLE, None, SubscriptionStatus.UNPAID, False, True)
    # a wider window lets the same decline be retried
    wide = ColombiaPolicy(window_days=60)
    assert decide(code, now=late, first=first, soft_failures=2, previous=code, policy=wide).action is Action.RETRY


def test_at_most_eight_retries_per_invoice() -> None:
    wide = ColombiaPolicy(window_days=60)
    assert decide("91", now=MONDAY, soft_failures=8, previous="91", policy=wide).action is Action.RETRY
    ninth = decide("91", now=MONDAY, soft_failures=9, previous="91", policy=wide)
    assert ninth.action is Action.UNCOLLECTIBLE and ninth.subscription_status is SubscriptionStatus.UNPAID


def test_a_card_declined_15_times_in_30_days_is_not_retried_and_the_final_action_follows() -> None:
    assert decide("91", now=MONDAY, card_declines=14).action is Action.RETRY
    canceled = ColombiaPolicy(final_action="canceled")
    decision = decide("91", now=MONDAY, card_declines=15, policy=canceled)
    assert decision.action is Action.UNCOLLECTIBLE and decision.subscription_status is SubscriptionStatus.CANCELED


def test_hard_declines_never_retry_the_card_as_before() -> None:
    decision = decide_after_decline(
        POLICY, DeclineClass.HARD, first_failure_at=MONDAY, soft_failures=0, now=MONDAY, code="54"
    )
    assert decision.action is Action.AWAIT_NEW_CARD and decision.card_unusable


def test_the_payday_hour_is_configurable() -> None:
    decision = decide("51", now=MONDAY, policy=ColombiaPolicy(payday_hour=14))
    assert decision.retry_at == datetime(2027, 1, 15, 14, 0, tzinfo=BOGOTA)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_days": 61}, "window_days must be a whole number from 1 to 60"),
        ({"window_days": 0}, "window_days must be a whole number from 1 to 60"),
        ({"payday_hour": 24}, "payday_hour must be a whole number from 0 to 23"),
        ({"final_action": "delete"}, "final_action must be"),
        ({"spaced_days": (3, 1)}, "strictly increasing"),
    ],
)
def test_a_bad_policy_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ColombiaPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_bad_card_count_is_refused() -> None:
    with pytest.raises(ValueError, match="card_declines must be an int >= 0"):
        decide("51", now=MONDAY, card_declines=-1)
