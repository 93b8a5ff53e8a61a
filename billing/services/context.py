"""What every use case needs, passed in: sessions, gateway, clock and policy. Built once per process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from billing.clock import Clock
from billing.db.models import OutboxMessage
from billing.domain.clock_rules import BOGOTA
from billing.domain.dunning import AnyDunningPolicy, DunningPolicy
from billing.gateway.models import Charge, CreditCard, Customer

log = logging.getLogger("billing.services")

OUTBOX_KEY = "billing.outbox_ids"


class Gateway(Protocol):
    """What the services use of `billing.gateway.TpagaClient`; `tests.fakes.FakeGateway` implements all of it."""

    def create_customer(
        self,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        email: str | None = None,
        merchant_customer_id: str | None = None,
    ) -> Customer: ...
    def associate_card(self, customer_id: str, temp_token: str) -> CreditCard: ...
    def charge(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge: ...
    async def charge_async(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Charge: ...
    def get_charge(self, charge_id: str) -> Charge: ...
    def refund(self, charge_id: str) -> Charge: ...


class Publisher(Protocol):
    """Sends one task intent to the broker (or runs it in-process)."""

    def publish(self, task_name: str, kwargs: dict[str, Any]) -> None: ...


class DropPublisher:
    """Marks intents delivered without sending: for `billing tick`, whose scans find the work anyway."""

    def publish(self, task_name: str, kwargs: dict[str, Any]) -> None:
        return None


@dataclass
class Context:
    sessions: sessionmaker[Session]
    gateway: Gateway
    clock: Clock
    policy: AnyDunningPolicy = field(default_factory=DunningPolicy)
    timezone: str = BOGOTA
    refund_window: str = "24h"
    # Our approval time trails Tpaga's by the response latency; keep a margin inside its window.
    refund_safety_margin: timedelta = timedelta(minutes=5)
    sending_lease: timedelta = timedelta(minutes=5)
    # How long a charge may take once its request is written (connect and read timeouts): a request must leave
    # at least this long before its lease ends, or its answer could come after reconciliation gave it up.
    answer_time: timedelta = timedelta(seconds=23.05)
    not_sent_backoff: timedelta = timedelta(seconds=60)
    # After this long with every call not sent (the gateway unreachable), billing pauses with an ALERT.
    unreachable_pause_after: timedelta = timedelta(minutes=5)
    # When this process last cleared a run of not-sent calls (monotonic seconds; see services.pause).
    reached_noted_at: float = float("-inf")
    publisher: Publisher | None = None
    # How far ahead the stream's advance notices go out (card.expiring, subscription.trial_will_end,
    # subscription.renewal_upcoming); zero turns one off.
    card_expiring_notice: timedelta = timedelta(days=30)
    trial_notice: timedelta = timedelta(days=3)
    renewal_notice: timedelta = timedelta(days=7)

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction; task intents written in it are published right after it commits."""
        with self.sessions() as session:
            with session.begin():
                yield session
            ids: list[int] = session.info.pop(OUTBOX_KEY, [])
        if ids:
            self.publish_outbox(ids)

    def publish_outbox(self, ids: list[int]) -> int:
        """Publish the given outbox rows (best effort; the relay catches what fails)."""
        if self.publisher is None:
            return 0
        published: list[int] = []
        with self.sessions() as session:
            rows = session.query(OutboxMessage).filter(OutboxMessage.id.in_(ids)).all()
        for row in rows:
            if row.published_at is not None:
                continue
            try:
                self.publisher.publish(row.task_name, dict(row.kwargs))
            except Exception as exc:  # the relay will retry; never lose the state change for a publish
                log.warning("publish of outbox %s (%s) failed: %s", row.id, row.task_name, type(exc).__name__)
                continue
            published.append(row.id)
        if published:
            with self.sessions() as session, session.begin():
                session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_(published), OutboxMessage.published_at.is_(None))
                    .values(published_at=self.clock.now())
                )
        return len(published)


def enqueue(session: Session, now: Any, task_name: str, **kwargs: Any) -> None:
    """Write a task intent in the caller's transaction (ids only: never secrets)."""
    row = OutboxMessage(task_name=task_name, kwargs=kwargs, created_at=now, published_at=None)
    session.add(row)
    session.flush()
    session.info.setdefault(OUTBOX_KEY, []).append(row.id)
