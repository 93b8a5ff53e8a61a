"""Every call has a deadline (defect 1, gateway part): the rate limiter's wait never runs past the caller's
deadline nor `TPAGA_RATE_LIMIT_MAX_WAIT`, and the deadline is checked again right before the request is written.
A call past it is `DeadlineExceededError` (a `NotSentError`) and the emulator's ledger shows it never arrived.
Real limiters (in-process and Redis), the emulator over HTTP, many concurrent callers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
import requests

from billing.gateway import Charge, CreditCard, DeadlineExceededError, NotSentError, TpagaClient
from billing.gateway.aio import close_transports
from billing.gateway.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread

CALLERS = 12
RATE = 4.0  # charges per second, one at a time (burst 1)
DEADLINE_SECONDS = 1.0  # room for the first slot and RATE * DEADLINE_SECONDS more, at most


def ledger_orders(server: SandboxThread) -> set[str]:
    response = requests.get(server.base_url + "__sandbox/ledger", timeout=10)
    response.raise_for_status()
    return {charge["orderId"] for charge in response.json()["charges"]}


def new_card(server: SandboxThread) -> CreditCard:
    with TpagaClient(server.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY) as setup:
        customer = setup.create_customer(email="deadline@example.com")
        token = setup.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="D")
        return setup.associate_card(customer.id, token)


def client_with(server: SandboxThread, limiter: RateLimiter, **options: Any) -> TpagaClient:
    return TpagaClient(server.api_url, DEFAULT_PRIVATE_KEY, rate_limiter=limiter, **options)


def fields(card: CreditCard, order_id: str) -> dict[str, Any]:
    return {"card_id": card.id, "amount": Decimal(4500), "order_id": order_id}


def split(results: dict[str, Charge | BaseException]) -> tuple[set[str], set[str]]:
    """(orders approved, orders not sent); anything else fails the test."""
    approved = {order for order, result in results.items() if isinstance(result, Charge) and result.approved}
    not_sent = {order for order, result in results.items() if isinstance(result, DeadlineExceededError)}
    assert approved | not_sent == set(results), results
    return approved, not_sent


@pytest.fixture
def redis_limiter(redis_server_url: str) -> Iterator[RedisRateLimiter]:
    limiter = RedisRateLimiter.from_url(redis_server_url, RATE, burst=1, key=f"test:deadline:{uuid.uuid4().hex}")
    yield limiter


def test_async_charges_over_their_deadline_are_not_sent_and_never_reach_tpaga(sandbox: SandboxThread) -> None:
    card = new_card(sandbox)
    client = client_with(sandbox, LocalRateLimiter(RATE, burst=1))

    async def crowd() -> dict[str, Charge | BaseException]:
        deadline = time.monotonic() + DEADLINE_SECONDS
        orders = [f"dl-async-{i}" for i in range(CALLERS)]
        try:
            outcomes = await asyncio.gather(
                *(client.charge_async(**fields(card, order), deadline=deadline) for order in orders),
                return_exceptions=True,
            )
        finally:
            await close_transports()
        return dict(zip(orders, outcomes, strict=True))

    started = time.monotonic()
    approved, not_sent = split(asyncio.run(crowd()))
    assert time.monotonic() - started < DEADLINE_SECONDS + 1.0  # nobody waited past the deadline
    assert 1 <= len(approved) <= RATE * DEADLINE_SECONDS + 1
    assert len(not_sent) >= CALLERS - (RATE * DEADLINE_SECONDS + 1)
    assert ledger_orders(sandbox) == approved


def test_threaded_charges_sharing_a_redis_limiter_stop_at_their_deadline(
    sandbox: SandboxThread, redis_limiter: RedisRateLimiter
) -> None:
    card = new_card(sandbox)
    client = client_with(sandbox, redis_limiter)
    deadline = time.monotonic() + DEADLINE_SECONDS

    def one(order: str) -> Charge | BaseException:
        try:
            return client.charge(**fields(card, order), deadline=deadline)
        except NotSentError as exc:
            return exc

    orders = [f"dl-redis-{i}" for i in range(CALLERS)]
    with ThreadPoolExecutor(CALLERS) as pool:
        approved, not_sent = split(dict(zip(orders, pool.map(one, orders), strict=True)))
    assert 1 <= len(approved) <= RATE * DEADLINE_SECONDS + 1
    assert len(not_sent) >= CALLERS - (RATE * DEADLINE_SECONDS + 1)
    assert ledger_orders(sandbox) == approved


def test_without_a_deadline_the_wait_is_bounded_by_the_max_wait(sandbox: SandboxThread) -> None:
    card = new_card(sandbox)
    client = client_with(sandbox, LocalRateLimiter(RATE, burst=1), rate_limit_max_wait_seconds=0.5)

    def one(order: str) -> Charge | BaseException:
        try:
            return client.charge(**fields(card, order))
        except NotSentError as exc:
            return exc

    orders = [f"dl-wait-{i}" for i in range(CALLERS)]
    with ThreadPoolExecutor(CALLERS) as pool:
        approved, not_sent = split(dict(zip(orders, pool.map(one, orders), strict=True)))
    assert 1 <= len(approved) <= RATE * 0.5 + 1
    assert len(not_sent) >= CALLERS - (RATE * 0.5 + 1)
    assert ledger_orders(sandbox) == approved


class SlowLimiter:
    """A limiter (acquire only) whose slot comes after the caller's deadline, as a slow Redis round trip or a
    busy process would grant it: the request must still not be written."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def acquire(self) -> None:
        self.calls += 1
        time.sleep(self.seconds)


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_slot_granted_after_the_deadline_sends_nothing(sandbox: SandboxThread, path: str) -> None:
    card = new_card(sandbox)
    limiter = SlowLimiter(0.3)
    client = client_with(sandbox, limiter)
    deadline = time.monotonic() + 0.1
    with pytest.raises(DeadlineExceededError):
        if path == "sync":
            client.charge(**fields(card, "dl-slow"), deadline=deadline)
        else:

            async def one() -> Charge:
                try:
                    return await client.charge_async(**fields(card, "dl-slow"), deadline=deadline)
                finally:
                    await close_transports()

            asyncio.run(one())
    assert limiter.calls == 1  # not retried: a retry would be later still
    assert ledger_orders(sandbox) == set()


def test_a_deadline_already_past_sends_nothing_and_takes_no_slot(sandbox: SandboxThread) -> None:
    card = new_card(sandbox)
    limiter = LocalRateLimiter(RATE, burst=1)
    client = client_with(sandbox, limiter)
    with pytest.raises(DeadlineExceededError):
        client.charge(**fields(card, "dl-past"), deadline=time.monotonic() - 0.01)
    assert limiter.reserve() == (True, 0.0)  # the first slot is still free
    assert ledger_orders(sandbox) == set()
