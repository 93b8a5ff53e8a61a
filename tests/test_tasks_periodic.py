"""The pieces under beat's periodic tasks: the per-task lease and the outbox relay (SQLite, in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.db.models import OutboxMessage
from billing.services.context import Context, enqueue
from billing.services.outbox import relay_outbox
from tasks import leases


class RecordingPublisher:
    """A publisher that records intents, failing from the `fail_from`-th call on."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.fail_from = fail_from

    def publish(self, task_name: str, kwargs: dict[str, Any]) -> None:
        if self.fail_from is not None and len(self.sent) + 1 >= self.fail_from:
            raise ConnectionError("broker down")
        self.sent.append((task_name, kwargs))


@pytest.fixture
def clock() -> TestClock:
    return TestClock()


@pytest.fixture
def ctx(sqlite_url: str, clock: TestClock) -> Iterator[Context]:
    migrate.upgrade(sqlite_url)
    context = build_context(Settings(database_url=sqlite_url), gateway=object(), clock=clock)  # type: ignore[arg-type]
    yield context
    context.sessions.kw["bind"].dispose()


def test_a_lease_is_taken_once_per_interval(ctx: Context, clock: TestClock) -> None:
    ttl = timedelta(seconds=8)
    assert leases.acquire(ctx, "billing.reconcile", ttl, "beat-a")
    assert not leases.acquire(ctx, "billing.reconcile", ttl, "beat-b")
    assert leases.acquire(ctx, "billing.relay_outbox", ttl, "beat-b")  # leases are per task
    clock.advance(timedelta(seconds=7))
    assert not leases.acquire(ctx, "billing.reconcile", ttl, "beat-b")
    clock.advance(timedelta(seconds=1))
    assert leases.acquire(ctx, "billing.reconcile", ttl, "beat-b")


def _intents(ctx: Context, *invoice_ids: int) -> None:
    with ctx.sessions() as session, session.begin():
        for invoice_id in invoice_ids:
            enqueue(session, ctx.clock.now(), "billing.charge_invoice", invoice_id=invoice_id)


def _unpublished(ctx: Context) -> list[int]:
    with ctx.sessions() as session:
        rows = session.execute(select(OutboxMessage).where(OutboxMessage.published_at.is_(None))).scalars()
        return [row.kwargs["invoice_id"] for row in rows]


def test_the_relay_publishes_only_intents_older_than_the_minimum_age(ctx: Context, clock: TestClock) -> None:
    publisher = RecordingPublisher()
    ctx.publisher = publisher
    _intents(ctx, 1, 2)
    clock.advance(timedelta(seconds=10))
    _intents(ctx, 3)
    assert relay_outbox(ctx, min_age=timedelta(seconds=5)) == {"published": 2, "failed": 0}
    assert publisher.sent == [
        ("billing.charge_invoice", {"invoice_id": 1}),
        ("billing.charge_invoice", {"invoice_id": 2}),
    ]
    assert _unpublished(ctx) == [3]
    assert relay_outbox(ctx, min_age=timedelta(seconds=5)) == {"published": 0, "failed": 0}


def test_the_relay_stops_at_the_first_failure_and_keeps_the_rest_for_later(ctx: Context, clock: TestClock) -> None:
    ctx.publisher = RecordingPublisher(fail_from=2)
    _intents(ctx, 1, 2, 3)
    clock.advance(timedelta(seconds=10))
    assert relay_outbox(ctx) == {"published": 1, "failed": 1}
    assert _unpublished(ctx) == [2, 3]
    with ctx.sessions() as session:
        attempts = dict(session.execute(select(OutboxMessage.id, OutboxMessage.publish_attempts)).all())
    assert attempts == {1: 1, 2: 1, 3: 0}
    ctx.publisher = RecordingPublisher()
    assert relay_outbox(ctx) == {"published": 2, "failed": 0}
    assert _unpublished(ctx) == []


def test_without_a_publisher_the_relay_does_nothing(ctx: Context, clock: TestClock) -> None:
    _intents(ctx, 1)
    clock.advance(timedelta(seconds=10))
    assert relay_outbox(ctx) == {"published": 0, "failed": 0}
    assert _unpublished(ctx) == [1]
