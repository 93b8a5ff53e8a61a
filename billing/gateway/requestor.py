"""The requestor: the one way a call reaches Tpaga, in a sync and an async form.

Each call runs the same steps inside the retry policy's tenacity loop: wait for a rate-limiter slot (never past
the call's wait deadline), check the caller's deadline once more right before the request is written, send it
through the transport, map the answer to a typed result or error. The endpoint methods of `TpagaClient` only
check their inputs and name the operation, the path and the body.

Deadlines are `time.monotonic()` values. Every call waits for the limiter at most `max_wait_seconds` in total,
and never past the caller's `deadline`; past either, it raises `DeadlineExceededError` (a `NotSentError` that is
not retried): nothing was sent. A batch passes "lease start + part of the lease" so that no charge leaves after
its attempt's lease may have expired and reconciliation may already have flagged it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from billing.gateway.aio import AsyncTransport
from billing.gateway.encoding import JsonValue, encode_json
from billing.gateway.environment import HttpEnvironment
from billing.gateway.errors import RefundRejectedError, map_response
from billing.gateway.operations import Operation
from billing.gateway.ratelimit import RateLimiter, acquire_async, acquire_before, too_late
from billing.gateway.retry import RandomSource, build_async_retrying, build_retrying, end_call
from billing.gateway.transport import BasicKeyAuth, RawResponse, Transport

T = TypeVar("T")

logger = logging.getLogger("billing.gateway")

# Threads for the rate limiter's Redis round trips on the async path: each is short, so a few serve every
# charge a loop keeps in flight.
BLOCKING_THREADS = 4


@dataclass(frozen=True)
class CallPolicy:
    """What every call shares: its retry policy and its rate limit."""

    attempts: int
    max_seconds: float
    rng: RandomSource
    sleep: Callable[[float], None]
    rate_limiter: RateLimiter | None
    max_wait_seconds: float

    def wait_deadline(self, deadline: float | None) -> float:
        """The latest a call that starts now may still wait for a limiter slot."""
        bound = time.monotonic() + self.max_wait_seconds
        return bound if deadline is None else min(deadline, bound)


def check_deadline(operation: Operation[Any], deadline: float | None) -> None:
    """Raise DeadlineExceededError when `deadline` has passed: the last check before a request is written."""
    if deadline is not None and time.monotonic() >= deadline:
        raise too_late(operation.name)


def read_answer(operation: Operation[T], raw: RawResponse, attempt_number: int) -> T:
    """The typed result of an answer, or its error. A retried void that meets "already voided" succeeded: an
    earlier attempt, whose answer was lost, did the void."""
    try:
        return map_response(operation, raw.status, raw.payload)
    except RefundRejectedError as rejected:
        if attempt_number > 1 and rejected.charge is not None and rejected.charge.voided:
            logger.info("tpaga %s: an earlier attempt had already voided the charge", operation.name)
            return cast(T, rejected.charge)
        raise


class Requestor:
    """Calls on the calling thread, through the threaded `requests` transport."""

    def __init__(self, transport: Transport, policy: CallPolicy, auth: BasicKeyAuth) -> None:
        self._transport = transport
        self._policy = policy
        self._auth = auth

    def request(
        self,
        operation: Operation[T],
        path: str,
        payload: dict[str, JsonValue] | None = None,
        *,
        auth: BasicKeyAuth | None = None,
        deadline: float | None = None,
    ) -> T:
        """One call: `path` is relative to the API URL and already quoted; `auth` defaults to the private key."""
        policy = self._policy
        body = None if payload is None else encode_json(payload)
        wait_until = policy.wait_deadline(deadline)
        retrying = build_retrying(
            operation, attempts=policy.attempts, max_seconds=policy.max_seconds, rng=policy.rng, sleep=policy.sleep
        )
        for attempt in retrying:
            with attempt:
                if policy.rate_limiter is not None:
                    acquire_before(policy.rate_limiter, wait_until)
                check_deadline(operation, deadline)
                raw = self._transport.send(operation, path, auth=auth or self._auth, body=body)
                return read_answer(operation, raw, attempt.retry_state.attempt_number)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover


class AsyncRequestor:
    """Calls as coroutines on the running event loop, through that loop's aiohttp transport."""

    def __init__(
        self,
        api_url: str,
        policy: CallPolicy,
        auth: BasicKeyAuth,
        *,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
        environment: HttpEnvironment,
    ) -> None:
        self._api_url = api_url
        self._policy = policy
        self._auth = auth
        self._connect_timeout_seconds = connect_timeout_seconds
        self._read_timeout_seconds = read_timeout_seconds
        self._environment = environment
        self._transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncTransport] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._blocking: ThreadPoolExecutor | None = None

    async def request(
        self,
        operation: Operation[T],
        path: str,
        payload: dict[str, JsonValue] | None = None,
        *,
        auth: BasicKeyAuth | None = None,
        deadline: float | None = None,
    ) -> T:
        """`Requestor.request` as a coroutine: the same steps, errors and retry rule."""
        policy = self._policy
        body = None if payload is None else encode_json(payload)
        transport = self._transport()
        wait_until = policy.wait_deadline(deadline)
        retrying = build_async_retrying(
            operation, attempts=policy.attempts, max_seconds=policy.max_seconds, rng=policy.rng
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if policy.rate_limiter is not None:
                        await acquire_async(policy.rate_limiter, self._run_blocking, wait_until)
                    check_deadline(operation, deadline)
                    raw = await transport.send(operation, path, auth=auth or self._auth, body=body)
                    return read_answer(operation, raw, attempt.retry_state.attempt_number)
        finally:
            end_call(retrying)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def _run_blocking(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """A short blocking call (the rate limiter's Redis round trip) off the event loop, on a few threads of
        the requestor's own: however many calls are in flight, they queue there instead of starting a thread
        each."""
        with self._lock:
            if self._blocking is None:
                self._blocking = ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="tpaga-rate")
            executor = self._blocking
        return asyncio.get_running_loop().run_in_executor(executor, fn)

    def _transport(self) -> AsyncTransport:
        """The aiohttp transport of the running event loop: one per loop, so a client used from two loops
        (two GatewayPools, or `asyncio.run` in two threads) never closes one loop's calls under another's."""
        loop = asyncio.get_running_loop()
        with self._lock:
            transport = self._transports.get(loop)
            if transport is None:
                transport = AsyncTransport(
                    self._api_url,
                    connect_timeout_seconds=self._connect_timeout_seconds,
                    read_timeout_seconds=self._read_timeout_seconds,
                    environment=self._environment,
                )
                self._transports[loop] = transport
        return transport

    def close(self) -> None:
        """Close every loop's aiohttp session (on its own loop) and the limiter's threads."""
        with self._lock:
            transports = list(self._transports.items())
            self._transports = weakref.WeakKeyDictionary()
            blocking, self._blocking = self._blocking, None
        for loop, transport in transports:
            _close_on_loop(loop, transport)
        if blocking is not None:
            blocking.shutdown(wait=False)

    async def aclose(self) -> None:
        """Close the running loop's aiohttp session."""
        with self._lock:
            transport = self._transports.pop(asyncio.get_running_loop(), None)
        if transport is not None:
            await transport.close()


def _close_on_loop(loop: asyncio.AbstractEventLoop, transport: AsyncTransport) -> None:
    """Close an aiohttp transport on its own loop, from any thread. A loop that is no longer running cannot
    close it any more: its sockets are closed when collected (use `aclose()` inside such a loop before it
    ends)."""
    if loop.is_closed() or not loop.is_running():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(transport.close())
        return
    future = asyncio.run_coroutine_threadsafe(transport.close(), loop)
    try:
        future.result(timeout=5)
    except Exception as exc:  # closing is best effort
        logger.debug("closing the aiohttp session failed: %s", type(exc).__name__)
