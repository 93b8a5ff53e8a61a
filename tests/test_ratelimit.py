"""The global gateway rate limit: a GCRA bucket in Redis shared by every caller, applied before each request.

No wall-clock assertions: the bucket's arithmetic is checked through the timestamps Redis stores and the
waits it hands out, and sleeping is injected.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests

from billing.config import Settings
from billing.gateway import NotSentError, TpagaClient
from billing.gateway.ratelimit import (
    LocalRateLimiter,
    RedisRateLimiter,
    default_burst,
    from_settings,
)
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY


@pytest.fixture
def redis_client(redis_server_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


@pytest.fixture
def key(redis_client: Any) -> Iterator[str]:
    name = f"billing-test:rate:{uuid.uuid4().hex}"
    yield name
    redis_client.delete(name)


class Sleeps:
    """An injected sleep that records instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def test_each_reservation_moves_the_shared_bucket_by_exactly_one_interval(redis_client: Any, key: str) -> None:
    # Given a 10/s limit with no burst, and a backlog (every call lands before the bucket drains)
    limiter = RedisRateLimiter(redis_client, 10, burst=1, key=key, max_reserve_seconds=60)
    tats = []
    waits = []
    for _ in range(5):
        reserved, wait = limiter.reserve()
        assert reserved
        waits.append(wait)
        tats.append(int(redis_client.get(key)))
    # Then the stored arrival time advances 100 ms per request and the waits line up behind each other
    assert [b - a for a, b in itertools.pairwise(tats)] == [100_000] * 4
    assert waits[0] == 0
    assert all(b > a for a, b in itertools.pairwise(waits))


def test_callers_on_different_connections_share_one_budget(redis_server_url: str, key: str, redis_client: Any) -> None:
    # Given two "machines" (separate clients) sharing a 1/s bucket already booked 10 s ahead, so that however
    # slowly this shared machine starts the threads, the bucket never falls idle in between
    machines = [
        RedisRateLimiter.from_url(redis_server_url, 1, burst=1, key=key, max_reserve_seconds=1000) for _ in "ab"
    ]
    for _ in range(10):
        assert machines[0].reserve()[0]
    start = int(redis_client.get(key))
    barrier = threading.Barrier(16)
    reserved: list[bool] = []

    def work(limiter: RedisRateLimiter) -> None:
        barrier.wait()
        reserved.extend(limiter.reserve()[0] for _ in range(20))

    # When eight threads on each reserve 20 requests at once
    threads = [threading.Thread(target=work, args=(m,)) for m in machines for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then all 320 got a slot, one interval (1 s) after another, whoever asked
    assert reserved == [True] * 320
    assert int(redis_client.get(key)) - start == 320 * 1_000_000


def test_a_burst_lets_that_many_requests_go_at_once(redis_client: Any, key: str) -> None:
    limiter = RedisRateLimiter(redis_client, 100, burst=5, key=key, max_reserve_seconds=60)
    waits = [limiter.reserve()[1] for _ in range(7)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert waits[5] > 0 and waits[6] > waits[5]


def test_a_caller_too_far_back_in_the_queue_does_not_reserve_and_asks_again(redis_client: Any, key: str) -> None:
    # Given 1 request/s and at most 5.5 s of reserved waiting
    limiter = RedisRateLimiter(redis_client, 1, burst=1, key=key, max_reserve_seconds=5.5)
    results = [limiter.reserve() for _ in range(7)]
    # Then six slots (0 to 5 s away) are reserved and the seventh (6 s away) is not
    assert [reserved for reserved, _ in results] == [True] * 6 + [False]
    assert results[6][1] > 5.5
    tat = int(redis_client.get(key))
    limiter.reserve()
    assert int(redis_client.get(key)) == tat  # asking again without a slot moves nothing


class ScriptedRedis:
    """A stand-in for redis.Redis whose script answers from a list: (reserved, wait in microseconds)."""

    def __init__(self, answers: list[tuple[int, int]]) -> None:
        self.answers = list(answers)

    def register_script(self, _source: str) -> Any:
        def run(keys: list[str], args: list[int]) -> tuple[int, str]:
            reserved, wait = self.answers.pop(0)
            return reserved, str(wait)

        return run


def test_acquire_waits_for_its_slot_and_polls_when_the_queue_is_long() -> None:
    sleeps = Sleeps()
    fake = ScriptedRedis([(0, 3_000_000), (0, 1_200_000), (1, 250_000)])
    RedisRateLimiter(fake, 10, max_reserve_seconds=1.0, sleep=sleeps).acquire()
    # 3 s away: sleep at most 0.5 s and ask again; 1.2 s away: sleep the 0.2 s beyond the reservable second
    assert sleeps.calls == pytest.approx([0.5, 0.2, 0.25])
    assert fake.answers == []


def test_acquire_returns_at_once_when_the_request_conforms() -> None:
    sleeps = Sleeps()
    RedisRateLimiter(ScriptedRedis([(1, 0)]), 10, sleep=sleeps).acquire()
    assert sleeps.calls == []


def test_an_unreachable_redis_means_the_request_is_not_sent() -> None:
    limiter = RedisRateLimiter.from_url("redis://127.0.0.1:1/0", 10)
    with pytest.raises(NotSentError, match="rate limiter unavailable") as caught:
        limiter.acquire()
    assert "127.0.0.1" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_the_local_limiter_spaces_requests_by_the_interval_after_the_burst() -> None:
    now = [100.0]
    sleeps = Sleeps()
    limiter = LocalRateLimiter(4, burst=2, clock=lambda: now[0], sleep=sleeps)
    for _ in range(5):
        limiter.acquire()
    assert sleeps.calls == pytest.approx([0.25, 0.5, 0.75])


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (float("inf"), None), (10, 0)])
def test_nonsense_limits_are_refused(rate: float, burst: int | None) -> None:
    with pytest.raises(ValueError):
        LocalRateLimiter(rate, burst=burst)


def test_the_default_burst_is_twenty_milliseconds_of_the_rate() -> None:
    assert [default_burst(r) for r in (1, 50, 51, 1000)] == [1, 1, 2, 20]


def test_the_setting_picks_no_limiter_a_shared_one_on_redis_or_a_local_one() -> None:
    assert from_settings(Settings(gateway_rate_limit_per_second=0)) is None
    shared = from_settings(Settings(gateway_rate_limit_per_second=500, broker_url="redis://127.0.0.1:6379/0"))
    assert isinstance(shared, RedisRateLimiter) and shared.rate_per_second == 500
    local = from_settings(Settings(gateway_rate_limit_per_second=5, broker_url="sqla+sqlite:///b.db"))
    assert isinstance(local, LocalRateLimiter)
    client = TpagaClient.from_settings(
        Settings(tpaga_private_key="k", gateway_rate_limit_per_second=5, broker_url="sqla+sqlite:///b.db")
    )
    assert isinstance(client.rate_limiter, LocalRateLimiter)


class CountingLimiter:
    def __init__(self) -> None:
        self.count = 0

    def acquire(self) -> None:
        self.count += 1


def test_every_request_to_tpaga_first_passes_the_limiter(sandbox: Any) -> None:
    limiter = CountingLimiter()
    client = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, rate_limiter=limiter)
    customer = client.create_customer(email="r@example.com")
    token = client.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2031, holder_name="R")
    card = client.associate_card(customer.id, token)
    charge = client.charge(card_id=card.id, amount=Decimal(4500), currency="COP", order_id="rl-1")
    client.get_charge(charge.id)
    client.refund(charge.id)
    stats = requests.get(sandbox.base_url + "__sandbox/stats", timeout=5).json()
    assert limiter.count == 6 == sum(stats["requests"].values())


def test_a_charge_is_not_sent_when_the_limiter_is_unreachable(sandbox: Any) -> None:
    client = TpagaClient(
        sandbox.api_url,
        DEFAULT_PRIVATE_KEY,
        rate_limiter=RedisRateLimiter.from_url("redis://127.0.0.1:1/0", 10),
        retry_max_seconds=0,
    )
    with pytest.raises(NotSentError):
        client.charge(card_id="c" * 32, amount=Decimal(4500), currency="COP", order_id="rl-2")
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=5).json()
    assert ledger["charges"] == []
