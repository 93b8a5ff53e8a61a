"""A global limit on requests per second to Tpaga, shared by every worker thread, process and machine.

`TPAGA_RATE_LIMIT` (requests per second, 0 = off) is enforced before every HTTP request the client sends
(charges, refunds, lookups, customers, cards, and each retry of them). It is a GCRA ("generic cell rate
algorithm", a token bucket kept as one timestamp) in Redis, run by a Lua script so that the read-modify-write
is atomic across all callers, with Redis's own clock (`TIME`) so machines with skewed clocks agree.

Each call reserves the next free slot and sleeps until it: callers queue in arrival order instead of polling,
and one round trip to Redis is all a request costs. A caller whose slot would be more than `max_reserve_seconds`
away does not reserve; it sleeps a little and asks again, so a crowd of waiting callers cannot push the bucket
arbitrarily far into the future. Over the limit the caller waits, but never past its deadline
(`acquire_before`): a caller whose slot would come after it reserves nothing and raises `DeadlineExceededError`
(a `NotSentError`: nothing was sent). The client gives every call such a deadline (`TPAGA_RATE_LIMIT_MAX_WAIT`,
and the caller's own, such as a charge's sending lease).

If Redis cannot be reached, no request is sent: `acquire()` raises `NotSentError`, which the client's retry
policy already treats as "provably not sent" (retried briefly, then recorded `not_sent` and rescheduled).
Sending anyway could break Tpaga's limit, and a 429 on a charge is an ambiguous answer, which is worse.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from billing.gateway.errors import DeadlineExceededError, NotSentError

if TYPE_CHECKING:
    from billing.config import Settings

logger = logging.getLogger("billing.gateway")

DEFAULT_KEY = "billing:tpaga:rate"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

# KEYS[1]: the bucket. ARGV: emission interval, burst tolerance and longest reservable wait, in microseconds.
# Returns {reserved (0|1), wait in microseconds}. The theoretical arrival time (TAT) is stored as a string
# formatted with %.0f: Lua 5.1 would print a large number in scientific notation and lose digits.
GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > max_wait then
  return {0, string.format('%.0f', wait)}
end
if wait < 0 then wait = 0 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, string.format('%.0f', wait)}
"""


class RateLimiter(Protocol):
    """Blocks until the caller may send one request. The limiters here also offer `acquire_before(deadline)`
    and `reserve`/`pause` (the async path's non-blocking form); the client uses them when present."""

    def acquire(self) -> None: ...


def too_late(operation: str = "rate_limit") -> DeadlineExceededError:
    """The error of a call whose slot (or whose request) would come after its deadline."""
    return DeadlineExceededError(
        "the call's deadline passed before its request could be sent; the request was not sent",
        operation=operation,
        cause="deadline",
    )


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (a time.monotonic() value); raises when none are left."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise too_late()
    return remaining


def _refused(reserved: bool, wait_seconds: float, remaining: float | None) -> bool:
    """Whether an unreserved slot can never come in time: the queue ahead only drains as fast as time passes,
    so a wait longer than the time left stays longer than it."""
    return not reserved and remaining is not None and wait_seconds > remaining


def default_burst(rate_per_second: float) -> int:
    """Requests that may go out back to back: 20 ms worth of the rate, at least one."""
    return max(1, math.ceil(rate_per_second / 50))


def _intervals(rate_per_second: float, burst: int | None) -> tuple[int, int]:
    if not rate_per_second > 0 or not math.isfinite(rate_per_second):
        raise ValueError("the rate limit must be a positive number of requests per second")
    burst = default_burst(rate_per_second) if burst is None else burst
    if burst < 1:
        raise ValueError("burst must be at least 1")
    interval_us = max(1, round(1_000_000 / rate_per_second))
    return interval_us, interval_us * (burst - 1)


class RedisRateLimiter:
    """The GCRA bucket in Redis, shared by every process that uses the same Redis and key."""

    def __init__(
        self,
        client: Any,
        rate_per_second: float,
        *,
        burst: int | None = None,
        key: str = DEFAULT_KEY,
        max_reserve_seconds: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval_us, self._tolerance_us = _intervals(rate_per_second, burst)
        self.rate_per_second = rate_per_second
        self._client = client
        self._key = key
        self._max_reserve_us = max(0, round(max_reserve_seconds * 1_000_000))
        self._sleep = sleep
        self._script = client.register_script(GCRA_SCRIPT)

    @classmethod
    def from_url(cls, url: str, rate_per_second: float, **kwargs: Any) -> RedisRateLimiter:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0, health_check_interval=30)
        return cls(client, rate_per_second, **kwargs)

    def __repr__(self) -> str:
        return f"RedisRateLimiter(rate_per_second={self.rate_per_second}, key={self._key!r})"

    def reserve(self, max_wait_seconds: float | None = None) -> tuple[bool, float]:
        """One round trip: (whether a slot was reserved, seconds to wait for it or before asking again). No slot
        further away than `max_wait_seconds` (or `max_reserve_seconds`) is reserved."""
        import redis

        max_reserve_us = self._max_reserve_us
        if max_wait_seconds is not None:
            max_reserve_us = min(max_reserve_us, max(0, int(max_wait_seconds * 1_000_000)))
        try:
            reserved, wait_us = self._script(
                keys=[self._key], args=[self._interval_us, self._tolerance_us, max_reserve_us]
            )
        except redis.RedisError as exc:
            # Raised outside the handler below: the Redis error (which may name the host) is not chained.
            failure = NotSentError(
                f"rate limiter unavailable ({type(exc).__name__}); the request was not sent",
                operation="rate_limit",
                cause=type(exc).__name__,
            )
        else:
            return bool(int(reserved)), int(wait_us) / 1_000_000
        raise failure

    def acquire(self) -> None:
        self.acquire_before(None)

    def acquire_before(self, deadline: float | None) -> None:
        """Wait for a slot that comes before `deadline` (time.monotonic()); DeadlineExceededError if none can."""
        while True:
            remaining = _remaining(deadline)
            reserved, wait_seconds = self.reserve(remaining)
            if _refused(reserved, wait_seconds, remaining):
                raise too_late()
            delay = self.pause(reserved, wait_seconds)
            if delay > 0:
                self._sleep(delay)
            if reserved:
                return

    def pause(self, reserved: bool, wait_seconds: float) -> float:
        """How long to sleep after `reserve()`: until the slot, or (none reserved: the queue ahead is longer than
        max_reserve_seconds) until it has drained somewhat, then ask again."""
        if reserved:
            return max(wait_seconds, 0.0)
        return min(max(wait_seconds - self._max_reserve_us / 1_000_000, 0.001), 0.5)


class LocalRateLimiter:
    """The same GCRA in this process only: for setups without Redis (the embedded broker) and for tests."""

    def __init__(
        self,
        rate_per_second: float,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        interval_us, tolerance_us = _intervals(rate_per_second, burst)
        self.rate_per_second = rate_per_second
        self._interval = interval_us / 1_000_000
        self._tolerance = tolerance_us / 1_000_000
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat = 0.0

    def __repr__(self) -> str:
        return f"LocalRateLimiter(rate_per_second={self.rate_per_second})"

    def acquire(self) -> None:
        self.acquire_before(None)

    def acquire_before(self, deadline: float | None) -> None:
        """Wait for a slot that comes before `deadline` (time.monotonic()); DeadlineExceededError if none can."""
        remaining = _remaining(deadline)
        reserved, wait = self.reserve(remaining)
        if _refused(reserved, wait, remaining):
            raise too_late()
        if wait > 0:
            self._sleep(wait)

    def reserve(self, max_wait_seconds: float | None = None) -> tuple[bool, float]:
        """Reserve the next slot unless it is further away than `max_wait_seconds`: (reserved, seconds to wait
        for it). Never blocks."""
        with self._lock:
            now = self._clock()
            tat = max(self._tat, now)
            wait = max(tat - self._tolerance - now, 0.0)
            if max_wait_seconds is not None and wait > max_wait_seconds:
                return False, wait
            self._tat = tat + self._interval
        return True, wait

    def pause(self, reserved: bool, wait_seconds: float) -> float:
        return wait_seconds


def acquire_before(limiter: RateLimiter, deadline: float | None) -> None:
    """`limiter.acquire_before(deadline)`, or plain `acquire()` for a limiter without it (its wait is then
    unbounded; the client still checks the deadline before sending)."""
    bounded = getattr(limiter, "acquire_before", None)
    if bounded is None:
        limiter.acquire()
    else:
        bounded(deadline)


async def acquire_async(
    limiter: RateLimiter,
    run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
    deadline: float | None = None,
) -> None:
    """`acquire_before(limiter, deadline)` for a coroutine: the reservation (a Redis round trip) runs through
    `run_blocking` (a thread, so the event loop keeps reading answers meanwhile) and the wait is an
    `asyncio.sleep`. A limiter without `reserve`/`pause` has its whole `acquire` run through `run_blocking`."""
    reserve = getattr(limiter, "reserve", None)
    pause = getattr(limiter, "pause", None)
    if reserve is None or pause is None:
        await run_blocking(limiter.acquire)
        return
    while True:
        remaining = _remaining(deadline)
        reserved, wait_seconds = await run_blocking(functools.partial(reserve, remaining))
        if _refused(reserved, wait_seconds, remaining):
            raise too_late()
        delay = pause(reserved, wait_seconds)
        if delay > 0:
            await asyncio.sleep(delay)
        if reserved:
            return


def from_settings(settings: Settings) -> RateLimiter | None:
    """The limiter `TPAGA_RATE_LIMIT` asks for: None when 0; shared through Redis when the broker is Redis."""
    rate = settings.gateway_rate_limit_per_second
    if not rate:
        return None
    if settings.broker_url.startswith(REDIS_SCHEMES):
        return RedisRateLimiter.from_url(settings.broker_url, rate)
    logger.warning(
        "TPAGA_RATE_LIMIT=%s is enforced per process: the broker is not Redis, so the limit cannot be shared",
        rate,
    )
    return LocalRateLimiter(rate)
