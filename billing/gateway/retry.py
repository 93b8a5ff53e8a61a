"""When a failed Tpaga call may be sent again, and how long to wait first (seconds-scale, via tenacity).

The rule (design.md invariant 3): a request that provably never left is always safe to send again; one that
may have reached Tpaga is sent again only when the call is idempotent (reads, refunds). A charge POST that may
have reached Tpaga is never sent again: Tpaga has no idempotency key and no charge search, so a second send
can charge the customer twice. 4xx answers and declines are never retried here (declines are dunning's job).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from billing.gateway.errors import DeadlineExceededError, NotSentError, OutcomeUnknownError
from billing.gateway.operations import Operation

__all__ = [
    "Operation",
    "RandomSource",
    "backoff_seconds",
    "build_async_retrying",
    "build_retrying",
    "call_budget_seconds",
    "should_retry",
]

logger = logging.getLogger("billing.gateway")

RETRYABLE_UNKNOWN_REASONS = frozenset({"timeout", "dropped", "server_error"})
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 2.0
DEFAULT_ATTEMPTS = 3
DEFAULT_MAX_SECONDS = 10.0


class RandomSource(Protocol):
    """Anything with `random()` in [0, 1), such as `random.Random`; tests pass a fixed one."""

    def random(self) -> float: ...


def should_retry(operation: Operation[Any], error: BaseException) -> bool:
    """Whether `operation` may be sent again after failing with `error`."""
    if isinstance(error, DeadlineExceededError):
        return False  # safe to send again, but too late for the caller that set the deadline
    if isinstance(error, NotSentError):
        return True
    if isinstance(error, OutcomeUnknownError):
        return operation.idempotent and error.reason in RETRYABLE_UNKNOWN_REASONS
    return False


def backoff_seconds(
    attempt: int,
    rng: RandomSource,
    *,
    base_seconds: float = BACKOFF_BASE_SECONDS,
    cap_seconds: float = BACKOFF_CAP_SECONDS,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): exponential with equal jitter.

    Half of the exponential step is fixed and half is random, so clients that failed together spread out
    without any of them retrying immediately.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    step = min(cap_seconds, base_seconds * 2.0 ** (attempt - 1))
    return step / 2 + step / 2 * rng.random()


def end_call(retrying: AsyncRetrying) -> None:
    """Drop a finished async call's controller state. AsyncRetrying keeps it where it points back at the
    controller (its current RetryCallState; the thread-local with the statistics and pending actions), in
    reference cycles that only the garbage collector would free; at batch rates those collections cost a worker
    more than the calls themselves. Dropping the two references frees them at once. (tenacity's private
    attributes: tests/test_gateway_aio.py checks that a charge leaves no cycle. The sync Retrying keeps its
    call state in its iterator's frame and leaves none.)"""
    vars(retrying).pop("_retry_state", None)
    retrying._local = threading.local()


def call_budget_seconds(
    *,
    rate_limit_max_wait_seconds: float,
    connect_timeout_seconds: float,
    read_timeout_seconds: float,
    attempts: int = DEFAULT_ATTEMPTS,
    base_seconds: float = BACKOFF_BASE_SECONDS,
    cap_seconds: float = BACKOFF_CAP_SECONDS,
) -> float:
    """The longest a charge may take from the start of its call until its answer, under this policy.

    The rate limiter's wait (bounded over the whole call), then every not-sent attempt but the last spending its
    connect timeout and the longest backoff after it, then the last attempt connecting and waiting for its
    answer. A sending lease shorter than this turns an ordinary slow answer into a review.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if min(rate_limit_max_wait_seconds, connect_timeout_seconds, read_timeout_seconds) < 0:
        raise ValueError("waits and timeouts must be >= 0")
    retries = attempts - 1
    backoffs = sum(min(cap_seconds, base_seconds * 2.0 ** (attempt - 1)) for attempt in range(1, attempts))
    return (
        rate_limit_max_wait_seconds
        + retries * connect_timeout_seconds
        + backoffs
        + connect_timeout_seconds
        + (read_timeout_seconds)
    )


def build_retrying(
    operation: Operation[Any],
    *,
    attempts: int,
    max_seconds: float,
    rng: RandomSource,
    sleep: Callable[[float], None],
) -> Retrying:
    """A tenacity controller for one call: bounded attempts and total time, jittered backoff, one WARNING per
    retry naming the operation, the attempt number and the error class (never ids, keys or URLs)."""
    return Retrying(**_policy(operation, attempts, max_seconds, rng), sleep=sleep)


def build_async_retrying(
    operation: Operation[Any],
    *,
    attempts: int,
    max_seconds: float,
    rng: RandomSource,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncRetrying:
    """`build_retrying`'s policy for `async for`: the same stop, wait, predicate and log."""
    return AsyncRetrying(**_policy(operation, attempts, max_seconds, rng), sleep=sleep)


def _policy(operation: Operation[Any], attempts: int, max_seconds: float, rng: RandomSource) -> dict[str, Any]:
    """The controller's settings but its sleep: what may be retried, for how long, how far apart, logged how."""

    def wait(state: RetryCallState) -> float:
        return backoff_seconds(state.attempt_number, rng)

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        reason = getattr(error, "reason", None)
        logger.warning(
            "tpaga %s attempt %d failed with %s%s; retrying in %.2fs",
            operation.name,
            state.attempt_number,
            type(error).__name__,
            f" ({reason})" if isinstance(reason, str) else "",
            state.upcoming_sleep,
        )

    return {
        "stop": stop_after_attempt(attempts) | stop_before_delay(max_seconds),
        "wait": wait,
        "retry": retry_if_exception(lambda error: should_retry(operation, error)),
        "before_sleep": log_retry,
        "reraise": True,
    }
