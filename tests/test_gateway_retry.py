"""The retry rule as a table, the jitter pinned, and tenacity's bounds (attempts, total time, log lines)."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest

from billing.gateway import (
    DeclinedError,
    NotFoundError,
    NotSentError,
    OutcomeUnknownError,
    RefundRejectedError,
    UnauthorizedError,
    UnexpectedStatusError,
    ValidationError,
    backoff_seconds,
    should_retry,
)
from billing.gateway.errors import DeadlineExceededError, map_response
from billing.gateway.operations import (
    ALL_OPERATIONS,
    ASSOCIATE_CARD,
    CHARGE,
    CREATE_CUSTOMER,
    GET_CARD,
    GET_CHARGE,
    GET_CUSTOMER,
    REFUND,
    TOKENIZE_CARD,
    Operation,
)
from billing.gateway.retry import build_retrying
from tests.test_gateway_mapping import declined, dumps


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def unknown(reason: Any) -> OutcomeUnknownError:
    return OutcomeUnknownError("x", reason=reason)


def decline() -> DeclinedError:
    with pytest.raises(DeclinedError) as caught:
        map_response(CHARGE, 402, dumps(declined("51")))
    return caught.value


NOT_SENT = NotSentError("x")
ERRORS_NEVER_RETRIED = [
    decline(),
    UnauthorizedError("x", http_status=401),
    ValidationError("x"),
    NotFoundError("x", http_status=404),
    RefundRejectedError("x", charge=None),
    UnexpectedStatusError("x", http_status=429),
    unknown("unknown_code"),
    unknown("malformed"),
    unknown("not_approved"),
    DeadlineExceededError("x", cause="deadline"),  # never left, but too late for its caller
    ValueError("a bug"),
    KeyboardInterrupt(),
]

IDEMPOTENT: list[Operation[Any]] = [GET_CUSTOMER, GET_CARD, GET_CHARGE, REFUND]
NOT_IDEMPOTENT: list[Operation[Any]] = [CREATE_CUSTOMER, TOKENIZE_CARD, ASSOCIATE_CARD, CHARGE]

TABLE: list[tuple[Operation[Any], BaseException, bool]] = [
    # never left: always safe to send again, a charge included
    *[(op, NOT_SENT, True) for op in ALL_OPERATIONS],
    # may have reached Tpaga: only idempotent calls go again
    *[(op, unknown(reason), True) for op in IDEMPOTENT for reason in ("timeout", "dropped", "server_error")],
    *[(op, unknown(reason), False) for op in NOT_IDEMPOTENT for reason in ("timeout", "dropped", "server_error")],
    # answers and ambiguous answers that a resend would not change: never
    *[(op, error, False) for op in ALL_OPERATIONS for error in ERRORS_NEVER_RETRIED],
]


@pytest.mark.parametrize(
    ("operation", "error", "expected"),
    TABLE,
    ids=[f"{op.name}-{type(e).__name__}-{getattr(e, 'reason', '')}" for op, e, _ in TABLE],
)
def test_should_retry_table(operation: Operation[Any], error: BaseException, expected: bool) -> None:
    assert should_retry(operation, error) is expected


def test_a_charge_that_may_have_reached_tpaga_is_never_retried() -> None:
    for reason in ("timeout", "dropped", "server_error", "unknown_code", "malformed", "not_approved"):
        assert not should_retry(CHARGE, unknown(reason))


def test_operations_know_their_idempotency() -> None:
    assert {op.name for op in ALL_OPERATIONS if op.idempotent} == {"get_customer", "get_card", "get_charge", "refund"}


@pytest.mark.parametrize(
    ("attempt", "draw", "seconds"),
    [
        (1, 0.0, 0.125),
        (1, 0.5, 0.1875),
        (1, 0.999, 0.125 + 0.125 * 0.999),
        (2, 0.0, 0.25),
        (2, 1.0, 0.5),
        (3, 0.0, 0.5),
        (4, 0.0, 1.0),
        (5, 0.0, 1.0),  # capped at 2 s: half fixed, half jitter
        (5, 1.0, 2.0),
        (50, 1.0, 2.0),
    ],
)
def test_backoff_is_exponential_with_pinned_jitter(attempt: int, draw: float, seconds: float) -> None:
    assert backoff_seconds(attempt, FixedRandom(draw)) == pytest.approx(seconds)


def test_backoff_spreads_within_its_bounds() -> None:
    rng = random.Random(7)
    waits = [backoff_seconds(3, rng) for _ in range(200)]
    assert all(0.5 <= w <= 1.0 for w in waits)
    assert len({round(w, 6) for w in waits}) > 100


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_seconds(0, FixedRandom(0))


class Script:
    """A callable that raises the given errors in order, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(
    operation: Operation[Any], script: Script, *, attempts: int = 3, max_seconds: float = 10.0
) -> tuple[Any, list[float]]:
    sleeps: list[float] = []
    retrying = build_retrying(
        operation, attempts=attempts, max_seconds=max_seconds, rng=FixedRandom(0.0), sleep=sleeps.append
    )
    return retrying(script), sleeps


def test_tenacity_retries_up_to_the_attempt_bound_then_reraises_the_error_itself() -> None:
    script = Script(NotSentError("1"), NotSentError("2"), NotSentError("3"), NotSentError("4"))
    with pytest.raises(NotSentError, match="3"):
        run(CHARGE, script)
    assert script.calls == 3


def test_tenacity_sleeps_the_pinned_backoff_between_attempts() -> None:
    script = Script(unknown("server_error"), unknown("timeout"))
    result, sleeps = run(GET_CHARGE, script)
    assert result == "ok" and script.calls == 3
    assert sleeps == [0.125, 0.25]


def test_tenacity_stops_before_exceeding_the_total_time() -> None:
    script = Script(NotSentError("1"), NotSentError("2"))
    with pytest.raises(NotSentError):
        run(GET_CHARGE, script, attempts=10, max_seconds=0.1)  # the first wait (0.125 s) would pass 0.1 s
    assert script.calls == 1


def test_a_charge_that_may_have_charged_is_raised_after_one_attempt() -> None:
    script = Script(unknown("dropped"))
    with pytest.raises(OutcomeUnknownError):
        run(CHARGE, script)
    assert script.calls == 1


def test_each_retry_logs_one_warning_with_operation_attempt_and_error_class(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    run(REFUND, Script(unknown("server_error"), NotSentError("x")))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "billing.gateway"]
    assert [r.getMessage() for r in warnings] == [
        "tpaga refund attempt 1 failed with OutcomeUnknownError (server_error); retrying in 0.12s",
        "tpaga refund attempt 2 failed with NotSentError; retrying in 0.25s",
    ]
