"""The dunning policy: what to do with an invoice after a declined charge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import pairwise

from billing.domain.clock_rules import BOGOTA, require_aware
from billing.domain.declines import DeclineClass, SoftReason, soft_reason
from billing.domain.paydays import next_payday_retry
from billing.domain.states import SubscriptionStatus

FINAL_ACTIONS: dict[str, SubscriptionStatus] = {
    "unpaid": SubscriptionStatus.UNPAID,
    "canceled": SubscriptionStatus.CANCELED,
}


class Action(StrEnum):
    RETRY = "retry"  # charge the same card again at retry_at
    UNCOLLECTIBLE = "uncollectible"  # retries exhausted: close the invoice unpaid
    AWAIT_NEW_CARD = "await_new_card"  # hard decline: never charge this card again
    PAUSE_MERCHANT = "pause_merchant"  # our misconfiguration: stop charging and alert
    REVIEW = "review"  # the outcome is unknown: no charge until resolved


def check_retry_days(days: object) -> tuple[int, ...]:
    """`days` itself when it is a schedule of retries: a tuple of strictly increasing positive whole days."""
    if not isinstance(days, tuple):
        raise ValueError(f"retry_days must be a tuple of whole days, got {type(days).__name__}")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in days):
        raise ValueError(f"retry_days must be whole days (int), got {days!r}")
    if any(d <= 0 for d in days) or any(a >= b for a, b in pairwise(days)):
        raise ValueError(f"retry_days must be strictly increasing positive days, got {days!r}")
    return days


@dataclass(frozen=True)
class DunningPolicy:
    """When to retry a soft-declined invoice and what happens to the subscription at the end.

    `retry_days` are days after the invoice's FIRST failure, strictly increasing and positive;
    an invoice gets `1 + len(retry_days)` charges in all. `final_action` ("unpaid" or
    "canceled") is the subscription's status once the retries are exhausted.
    """

    retry_days: tuple[int, ...] = (1, 3, 5, 7)
    final_action: str = "unpaid"
    # Card networks penalise rapid retries: after downtime, a late schedule is spread out, not fired at once.
    min_retry_gap: timedelta = timedelta(hours=12)

    def __post_init__(self) -> None:
        check_retry_days(self.retry_days)
        if not isinstance(self.min_retry_gap, timedelta) or self.min_retry_gap < timedelta(0):
            raise ValueError(f"min_retry_gap must be a non-negative timedelta, got {self.min_retry_gap!r}")
        if self.final_action not in FINAL_ACTIONS:
            raise ValueError(f"final_action must be 'unpaid' or 'canceled', got {self.final_action!r}")

    @property
    def final_status(self) -> SubscriptionStatus:
        """The subscription status once the retries are exhausted."""
        return FINAL_ACTIONS[self.final_action]

    @property
    def max_soft_failures(self) -> int:
        """Soft declines an invoice may collect before it is uncollectible."""
        return len(self.retry_days) + 1


MAX_WINDOW_DAYS = 60


def _whole(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return value


@dataclass(frozen=True)
class ColombiaPolicy:
    """Retries timed by why the charge was declined, on Colombia's calendar.

    Insufficient funds: the next payday (15th and last day of the month, moved back to the previous business
    day) or the business day after it, at `payday_hour` in America/Bogota, never sooner than `funds_gap` after
    the decline. Issuer or switch unavailable: `issuer_first_retry` after the first such decline, then
    `issuer_next_retry` after each following one. Other soft declines: `spaced_days` after the invoice's first
    failure. Every retry lies within `window_days` of the first failure; an invoice gets at most
    `max_retries` retries and a card at most `max_card_declines` declines in `card_period` (the card networks'
    excessive-retry rules); past any of these the invoice is uncollectible.
    """

    window_days: int = 21
    payday_hour: int = 9
    final_action: str = "unpaid"
    max_retries: int = 8
    max_card_declines: int = 15
    card_period: timedelta = timedelta(days=30)
    funds_gap: timedelta = timedelta(days=1)
    issuer_first_retry: timedelta = timedelta(hours=2)
    issuer_next_retry: timedelta = timedelta(days=1)
    spaced_days: tuple[int, ...] = (1, 3, 5, 8, 12, 16, 21)
    min_retry_gap: timedelta = timedelta(hours=12)
    timezone: str = BOGOTA

    def __post_init__(self) -> None:
        _whole("window_days", self.window_days, 1, MAX_WINDOW_DAYS)
        _whole("payday_hour", self.payday_hour, 0, 23)
        _whole("max_retries", self.max_retries, 0, 100)
        _whole("max_card_declines", self.max_card_declines, 1, 1000)
        check_retry_days(self.spaced_days)
        if self.final_action not in FINAL_ACTIONS:
            raise ValueError(f"final_action must be 'unpaid' or 'canceled', got {self.final_action!r}")

    @property
    def final_status(self) -> SubscriptionStatus:
        return FINAL_ACTIONS[self.final_action]


AnyDunningPolicy = DunningPolicy | ColombiaPolicy


@dataclass(frozen=True)
class DunningDecision:
    """What the caller must apply after an attempt failed.

    `retry_at` is set only for `Action.RETRY`. `subscription_status` None means leave the
    subscription as it is. `card_unusable` marks the card never to be charged again.
    `counts_as_attempt` is False when the customer's dunning attempts were not spent.
    """

    action: Action
    retry_at: datetime | None
    subscription_status: SubscriptionStatus | None
    card_unusable: bool
    counts_as_attempt: bool

    def __post_init__(self) -> None:
        if (self.action is Action.RETRY) != (self.retry_at is not None):
            raise ValueError(f"retry_at must be set exactly when the action is retry: {self!r}")
        if self.retry_at is not None:
            require_aware("retry_at", self.retry_at)


_MERCHANT_PAUSE = DunningDecision(
    action=Action.PAUSE_MERCHANT,
    retry_at=None,
    subscription_status=None,
    card_unusable=False,
    counts_as_attempt=False,
)

# An unknown outcome may still turn out approved; it is decided again once a lookup or an
# operator resolves it, so it spends nothing now.
_REVIEW = DunningDecision(
    action=Action.REVIEW,
    retry_at=None,
    subscription_status=None,
    card_unusable=False,
    counts_as_attempt=False,
)

_HARD = DunningDecision(
    action=Action.AWAIT_NEW_CARD,
    retry_at=None,
    subscription_status=SubscriptionStatus.PAST_DUE,
    card_unusable=True,
    counts_as_attempt=True,
)


def decide_after_decline(
    policy: AnyDunningPolicy,
    decline_class: DeclineClass,
    *,
    first_failure_at: datetime,
    soft_failures: int,
    now: datetime,
    code: str = "",
    previous_code: str | None = None,
    card_declines: int = 0,
) -> DunningDecision:
    """The decision after a declined (or unknown) charge of one invoice.

    `soft_failures` counts this invoice's soft declines INCLUDING the one just recorded.
    Soft: retry at first_failure_at + retry_days[soft_failures - 1], but never sooner than
    `min_retry_gap` after this decline (so a schedule that fell behind is not fired all at once),
    subscription past_due; once retries are exhausted the invoice is uncollectible and the
    subscription takes the policy's final status. Hard: wait for a new card. Merchant: pause,
    spending none of the customer's attempts. Unknown: review. Approved is not a decline and
    raises ValueError.

    The colombia policy also reads `code` (the errorCode just recorded), `previous_code` (the invoice's
    decline before it, None for the first) and `card_declines` (the card's declines within the policy's
    card period, this one included); the fixed policy ignores them.
    """
    try:
        klass = DeclineClass(decline_class)
    except ValueError:
        raise ValueError(f"unknown decline class {decline_class!r}") from None
    require_aware("first_failure_at", first_failure_at)
    require_aware("now", now)
    if isinstance(soft_failures, bool) or not isinstance(soft_failures, int) or soft_failures < 0:
        raise ValueError(f"soft_failures must be an int >= 0, got {soft_failures!r}")

    if klass is DeclineClass.APPROVED:
        raise ValueError("an approved charge is not a decline; there is nothing to dun")
    if klass is DeclineClass.MERCHANT:
        return _MERCHANT_PAUSE
    if klass is DeclineClass.UNKNOWN:
        return _REVIEW
    if klass is DeclineClass.HARD:
        return _HARD

    if soft_failures < 1:
        raise ValueError("soft_failures must include the soft decline just recorded (>= 1), got 0")
    if isinstance(policy, ColombiaPolicy):
        if isinstance(card_declines, bool) or not isinstance(card_declines, int) or card_declines < 0:
            raise ValueError(f"card_declines must be an int >= 0, got {card_declines!r}")
        retry_at = _colombia_retry_at(policy, code, previous_code, first_failure_at, soft_failures, now)
        if retry_at is None or card_declines >= policy.max_card_declines:
            return _give_up(policy)
        return _retry(retry_at)
    if soft_failures > len(policy.retry_days):
        return _give_up(policy)
    retry_at = first_failure_at + timedelta(days=policy.retry_days[soft_failures - 1])
    return _retry(max(retry_at, now + policy.min_retry_gap))


def _colombia_retry_at(
    policy: ColombiaPolicy,
    code: str,
    previous_code: str | None,
    first_failure_at: datetime,
    soft_failures: int,
    now: datetime,
) -> datetime | None:
    """When the colombia policy retries this soft decline; None when no retry fits its limits."""
    if soft_failures > policy.max_retries:  # soft_failures - 1 retries were made already
        return None
    reason = soft_reason(code)
    if reason is SoftReason.FUNDS:
        retry_at = next_payday_retry(now, gap=policy.funds_gap, hour=policy.payday_hour, timezone=policy.timezone)
    elif reason is SoftReason.ISSUER:
        again = previous_code is not None and soft_reason(previous_code) is SoftReason.ISSUER
        retry_at = now + (policy.issuer_next_retry if again else policy.issuer_first_retry)
    else:
        days = [d for d in policy.spaced_days if first_failure_at + timedelta(days=d) > now]
        if not days:
            return None
        retry_at = max(first_failure_at + timedelta(days=days[0]), now + policy.min_retry_gap)
    return retry_at if retry_at <= first_failure_at + timedelta(days=policy.window_days) else None


def _retry(retry_at: datetime) -> DunningDecision:
    return DunningDecision(
        action=Action.RETRY,
        retry_at=retry_at.astimezone(UTC),
        subscription_status=SubscriptionStatus.PAST_DUE,
        card_unusable=False,
        counts_as_attempt=True,
    )


def _give_up(policy: AnyDunningPolicy) -> DunningDecision:
    return DunningDecision(
        action=Action.UNCOLLECTIBLE,
        retry_at=None,
        subscription_status=policy.final_status,
        card_unusable=False,
        counts_as_attempt=True,
    )


def decide_after_unauthorized() -> DunningDecision:
    """The decision after Tpaga answered 401: our keys are wrong, so pause like a merchant decline."""
    return _MERCHANT_PAUSE
