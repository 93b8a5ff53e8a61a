"""Dunning: what happens to an invoice and its subscription after each kind of decline."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.declines import DeclineClass
from billing.domain.dunning import (
    Action,
    DunningDecision,
    DunningPolicy,
    decide_after_decline,
    decide_after_unauthorized,
)
from billing.domain.states import SubscriptionStatus

FIRST_FAILURE = datetime(2026, 3, 1, 14, 0, tzinfo=UTC)
DEFAULT = DunningPolicy()


def days(n: float) -> timedelta:
    return timedelta(days=n)


def soft(policy: DunningPolicy, soft_failures: int, now: datetime) -> DunningDecision:
    return decide_after_decline(
        policy, DeclineClass.SOFT, first_failure_at=FIRST_FAILURE, soft_failures=soft_failures, now=now
    )


def test_the_default_policy_retries_on_days_1_3_5_7_and_then_marks_the_subscription_unpaid() -> None:
    assert DEFAULT.retry_days == (1, 3, 5, 7)
    assert DEFAULT.final_action == "unpaid"
    assert DEFAULT.final_status is SubscriptionStatus.UNPAID
    assert DEFAULT.max_soft_failures == 5


@pytest.mark.parametrize(
    ("soft_failures", "now", "retry_at"),
    [
        (1, FIRST_FAILURE, FIRST_FAILURE + days(1)),
        (2, FIRST_FAILURE + days(1), FIRST_FAILURE + days(3)),
        (3, FIRST_FAILURE + days(3), FIRST_FAILURE + days(5)),
        (4, FIRST_FAILURE + days(5), FIRST_FAILURE + days(7)),
    ],
)
def test_a_soft_decline_retries_on_the_schedule_counted_from_the_first_failure(
    soft_failures: int, now: datetime, retry_at: datetime
) -> None:
    assert soft(DEFAULT, soft_failures, now) == DunningDecision(
        action=Action.RETRY,
        retry_at=retry_at,
        subscription_status=SubscriptionStatus.PAST_DUE,
        card_unusable=False,
        counts_as_attempt=True,
    )


def test_a_late_retry_does_not_push_the_rest_of_the_schedule_back() -> None:
    # the day-1 retry ran 20 hours late; the next one is still day 3 after the first failure
    assert soft(DEFAULT, 2, FIRST_FAILURE + days(1) + timedelta(hours=20)).retry_at == FIRST_FAILURE + days(3)


def test_a_retry_whose_time_has_already_passed_waits_the_minimum_gap_instead_of_firing_at_once() -> None:
    now = FIRST_FAILURE + days(4)  # the worker was down; day 3 is past
    decision = soft(DEFAULT, 2, now)
    assert decision.action is Action.RETRY
    assert decision.retry_at == now + timedelta(hours=12)


def test_after_a_week_of_downtime_the_remaining_retries_stay_at_least_the_minimum_gap_apart() -> None:
    now = FIRST_FAILURE + days(8)
    times = []
    for failures in (2, 3, 4):
        decision = soft(DEFAULT, failures, now)
        times.append(decision.retry_at)
        now = decision.retry_at
    assert all(b - a >= timedelta(hours=12) for a, b in itertools.pairwise(times))


def test_a_zero_gap_policy_retries_a_late_schedule_at_once() -> None:
    policy = DunningPolicy(min_retry_gap=timedelta(0))
    now = FIRST_FAILURE + days(4)
    assert soft(policy, 2, now).retry_at == now


def test_a_negative_minimum_gap_is_refused() -> None:
    with pytest.raises(ValueError, match="min_retry_gap"):
        DunningPolicy(min_retry_gap=timedelta(hours=-1))


@pytest.mark.parametrize(
    ("final_action", "status"),
    [("unpaid", SubscriptionStatus.UNPAID), ("canceled", SubscriptionStatus.CANCELED)],
)
def test_soft_declines_through_every_retry_end_uncollectible_with_the_final_action(
    final_action: str, status: SubscriptionStatus
) -> None:
    policy = DunningPolicy(retry_days=(1, 3, 5, 7), final_action=final_action)
    actions = [soft(policy, n, FIRST_FAILURE + days(n)).action for n in range(1, 6)]
    assert actions == [Action.RETRY, Action.RETRY, Action.RETRY, Action.RETRY, Action.UNCOLLECTIBLE]
    assert soft(policy, 5, FIRST_FAILURE + days(7)) == DunningDecision(
        action=Action.UNCOLLECTIBLE,
        retry_at=None,
        subscription_status=status,
        card_unusable=False,
        counts_as_attempt=True,
    )


def test_a_policy_without_retries_makes_the_first_soft_decline_uncollectible() -> None:
    decision = soft(DunningPolicy(retry_days=()), 1, FIRST_FAILURE)
    assert decision.action is Action.UNCOLLECTIBLE
    assert decision.subscription_status is SubscriptionStatus.UNPAID


def test_a_hard_decline_waits_for_a_new_card_and_marks_this_one_unusable() -> None:
    decision = decide_after_decline(
        DEFAULT, DeclineClass.HARD, first_failure_at=FIRST_FAILURE, soft_failures=0, now=FIRST_FAILURE
    )
    assert decision == DunningDecision(
        action=Action.AWAIT_NEW_CARD,
        retry_at=None,
        subscription_status=SubscriptionStatus.PAST_DUE,
        card_unusable=True,
        counts_as_attempt=True,
    )


def test_a_hard_decline_after_soft_ones_still_waits_for_a_new_card() -> None:
    decision = decide_after_decline(
        DEFAULT, DeclineClass.HARD, first_failure_at=FIRST_FAILURE, soft_failures=2, now=FIRST_FAILURE + days(3)
    )
    assert decision.action is Action.AWAIT_NEW_CARD


def test_a_merchant_decline_pauses_without_spending_the_customers_attempts() -> None:
    decision = decide_after_decline(
        DEFAULT, DeclineClass.MERCHANT, first_failure_at=FIRST_FAILURE, soft_failures=0, now=FIRST_FAILURE
    )
    assert decision == DunningDecision(
        action=Action.PAUSE_MERCHANT,
        retry_at=None,
        subscription_status=None,
        card_unusable=False,
        counts_as_attempt=False,
    )


def test_a_401_pauses_exactly_like_a_merchant_decline() -> None:
    merchant = decide_after_decline(
        DEFAULT, DeclineClass.MERCHANT, first_failure_at=FIRST_FAILURE, soft_failures=0, now=FIRST_FAILURE
    )
    assert decide_after_unauthorized() == merchant


def test_an_unknown_outcome_goes_to_review_and_is_never_retried() -> None:
    decision = decide_after_decline(
        DEFAULT, DeclineClass.UNKNOWN, first_failure_at=FIRST_FAILURE, soft_failures=0, now=FIRST_FAILURE
    )
    assert decision == DunningDecision(
        action=Action.REVIEW,
        retry_at=None,
        subscription_status=None,
        card_unusable=False,
        counts_as_attempt=False,
    )


def test_an_approved_charge_is_not_a_decline() -> None:
    with pytest.raises(ValueError, match="not a decline"):
        decide_after_decline(
            DEFAULT, DeclineClass.APPROVED, first_failure_at=FIRST_FAILURE, soft_failures=0, now=FIRST_FAILURE
        )


def test_decline_classes_may_be_passed_as_their_stored_strings() -> None:
    decision = decide_after_decline(
        DEFAULT,
        "soft",  # type: ignore[arg-type]
        first_failure_at=FIRST_FAILURE,
        soft_failures=1,
        now=FIRST_FAILURE,
    )
    assert decision.action is Action.RETRY


def test_retry_times_are_returned_in_utc() -> None:
    bogota_time = timezone(timedelta(hours=-5))
    first = datetime(2026, 3, 1, 9, 0, tzinfo=bogota_time)
    decision = decide_after_decline(DEFAULT, DeclineClass.SOFT, first_failure_at=first, soft_failures=1, now=first)
    assert decision.retry_at == datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    assert decision.retry_at is not None and decision.retry_at.tzinfo is UTC


NAIVE = datetime(2026, 3, 1, 14, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"soft_failures": 0}, r"soft_failures must include the soft decline just recorded"),
        ({"soft_failures": -1}, r"soft_failures must be an int >= 0"),
        ({"soft_failures": True}, r"soft_failures must be an int >= 0"),
        ({"soft_failures": 1.0}, r"soft_failures must be an int >= 0"),
        ({"first_failure_at": NAIVE}, r"first_failure_at must be timezone-aware"),
        ({"now": NAIVE}, r"now must be timezone-aware"),
        ({"decline_class": "declined"}, r"unknown decline class 'declined'"),
    ],
)
def test_bad_arguments_raise_a_precise_value_error(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "decline_class": DeclineClass.SOFT,
        "first_failure_at": FIRST_FAILURE,
        "soft_failures": 1,
        "now": FIRST_FAILURE,
        **kwargs,
    }
    decline_class = arguments.pop("decline_class")
    with pytest.raises(ValueError, match=message):
        decide_after_decline(DEFAULT, decline_class, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry_days": (3, 1)}, "strictly increasing positive"),
        ({"retry_days": (1, 1)}, "strictly increasing positive"),
        ({"retry_days": (0, 1)}, "strictly increasing positive"),
        ({"retry_days": (-1,)}, "strictly increasing positive"),
        ({"retry_days": (1.5,)}, "whole days"),
        ({"retry_days": (True,)}, "whole days"),
        ({"retry_days": [1, 3]}, "must be a tuple"),
        ({"final_action": "deleted"}, "final_action must be 'unpaid' or 'canceled'"),
    ],
)
def test_a_malformed_policy_is_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DunningPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_decision_carries_a_retry_time_exactly_when_it_retries() -> None:
    with pytest.raises(ValueError, match="retry_at must be set exactly when"):
        DunningDecision(Action.RETRY, None, SubscriptionStatus.PAST_DUE, False, True)
    with pytest.raises(ValueError, match="retry_at must be set exactly when"):
        DunningDecision(Action.REVIEW, FIRST_FAILURE, None, False, False)


policies = st.builds(
    DunningPolicy,
    retry_days=st.lists(st.integers(1, 60), max_size=8, unique=True).map(lambda ds: tuple(sorted(ds))),
    final_action=st.sampled_from(["unpaid", "canceled"]),
)


@given(policy=policies, elapsed_hours=st.lists(st.integers(0, 24 * 90), min_size=1, max_size=12))
def test_soft_dunning_retries_never_go_back_in_time_and_end_after_the_last_retry_day(
    policy: DunningPolicy, elapsed_hours: list[int]
) -> None:
    nows = [FIRST_FAILURE + timedelta(hours=h) for h in sorted(elapsed_hours)]
    for soft_failures in range(1, policy.max_soft_failures + 2):
        now = nows[min(soft_failures - 1, len(nows) - 1)]
        decision = soft(policy, soft_failures, now)
        if soft_failures <= len(policy.retry_days):
            assert decision.action is Action.RETRY
            assert decision.retry_at is not None
            assert decision.retry_at >= now
            assert decision.retry_at == max(
                now + policy.min_retry_gap, FIRST_FAILURE + days(policy.retry_days[soft_failures - 1])
            )
        else:
            assert decision.action is Action.UNCOLLECTIBLE
            assert decision.subscription_status is policy.final_status
