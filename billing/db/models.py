"""SQLAlchemy 2.0 typed models. Every constraint is named; indexes make worker queries O(work found)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (naive storage) and PostgreSQL (timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


Timestamp = Annotated[datetime, mapped_column(UTCDateTime())]
AmountMinor = Annotated[int, mapped_column(BigInteger)]
Currency = Annotated[str, mapped_column(String(3))]
BigId = Annotated[int, mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)]


def _fk(target: str, **kw: Any) -> Any:
    return mapped_column(BigInteger().with_variant(Integer, "sqlite"), ForeignKey(target), **kw)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON}


class Control(Base):
    """Process-wide switches stored in the database: the test clock offset, the billing pause."""

    __tablename__ = "control"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[Timestamp]


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[BigId]
    tpaga_customer_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    merchant_customer_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    first_name: Mapped[str | None] = mapped_column(String(128))
    last_name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[Timestamp]


class Card(Base):
    __tablename__ = "cards"
    __table_args__ = (
        CheckConstraint("status in ('usable', 'unusable')", name="status"),
        Index("ix_cards_customer_status", "customer_id", "status"),
    )
    id: Mapped[BigId]
    customer_id: Mapped[int] = _fk("customers.id")
    tpaga_card_id: Mapped[str] = mapped_column(String(64), unique=True)
    brand: Mapped[str | None] = mapped_column(String(32))
    last_four: Mapped[str | None] = mapped_column(String(4))
    exp_month: Mapped[int | None]
    exp_year: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), default="usable")
    unusable_code: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[Timestamp]

    def __repr__(self) -> str:
        return f"Card(id={self.id}, brand={self.brand}, last_four={self.last_four}, status={self.status})"


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("interval_count >= 1", name="interval_count_positive"),
        CheckConstraint("trial_days >= 0", name="trial_days_nonnegative"),
        CheckConstraint("interval in ('day', 'week', 'month', 'year')", name="interval"),
    )
    id: Mapped[BigId]
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    interval: Mapped[str] = mapped_column(String(8))
    interval_count: Mapped[int] = mapped_column(default=1)
    trial_days: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[Timestamp]


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("status in ('trialing', 'active', 'past_due', 'unpaid', 'canceled')", name="status"),
        # Beat's scan: only subscriptions that will renew carry next_billing_at.
        Index(
            "ix_subscriptions_due",
            "next_billing_at",
            postgresql_where=text("next_billing_at IS NOT NULL"),
            sqlite_where=text("next_billing_at IS NOT NULL"),
        ),
        Index("ix_subscriptions_customer", "customer_id"),
    )
    id: Mapped[BigId]
    customer_id: Mapped[int] = _fk("customers.id")
    plan_id: Mapped[int] = _fk("plans.id")
    card_id: Mapped[int | None] = _fk("cards.id")
    status: Mapped[str] = mapped_column(String(16))
    anchor_at: Mapped[Timestamp]
    next_period_index: Mapped[int] = mapped_column(default=0)
    next_billing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    current_period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())
    current_period_end: Mapped[datetime | None] = mapped_column(UTCDateTime())
    trial_end_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    updated_at: Mapped[Timestamp]


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period_index", name="uq_invoices_subscription_period"),
        CheckConstraint("state in ('open', 'paid', 'review', 'uncollectible', 'void')", name="state"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        # The charge scan: open invoices whose next attempt is scheduled.
        Index(
            "ix_invoices_due",
            "due_at",
            postgresql_where=text("state = 'open' AND due_at IS NOT NULL"),
            sqlite_where=text("state = 'open' AND due_at IS NOT NULL"),
        ),
        Index(
            "ix_invoices_review",
            "updated_at",
            postgresql_where=text("state = 'review'"),
            sqlite_where=text("state = 'review'"),
        ),
        Index("ix_invoices_state", "state"),
    )
    id: Mapped[BigId]
    subscription_id: Mapped[int] = _fk("subscriptions.id")
    period_index: Mapped[int]
    period_start: Mapped[Timestamp]
    period_end: Mapped[Timestamp]
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    state: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempt_count: Mapped[int] = mapped_column(default=0)
    soft_failures: Mapped[int] = mapped_column(default=0)
    first_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error_code: Mapped[str | None] = mapped_column(String(16))
    review_reason: Mapped[str | None] = mapped_column(String(255))
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    updated_at: Mapped[Timestamp]


class ChargeAttempt(Base):
    __tablename__ = "charge_attempts"
    __table_args__ = (
        UniqueConstraint("invoice_id", "attempt_number", name="uq_charge_attempts_invoice_number"),
        CheckConstraint(
            "state in ('pending', 'sending', 'approved', 'declined', 'unknown', 'not_sent', 'duplicate')", name="state"
        ),
        # Invariant 1 in the database: at most one approved attempt per invoice...
        Index(
            "uq_charge_attempts_one_approved",
            "invoice_id",
            unique=True,
            postgresql_where=text("state = 'approved'"),
            sqlite_where=text("state = 'approved'"),
        ),
        # ...and at most one attempt in flight or unresolved per invoice (invariant 3).
        Index(
            "uq_charge_attempts_one_open",
            "invoice_id",
            unique=True,
            postgresql_where=text("state in ('pending', 'sending', 'unknown')"),
            sqlite_where=text("state in ('pending', 'sending', 'unknown')"),
        ),
        Index(
            "ix_charge_attempts_inflight",
            "lease_expires_at",
            postgresql_where=text("state in ('pending', 'sending')"),
            sqlite_where=text("state in ('pending', 'sending')"),
        ),
        Index(
            "ix_charge_attempts_unknown",
            "id",
            postgresql_where=text("state = 'unknown'"),
            sqlite_where=text("state = 'unknown'"),
        ),
        Index("ix_charge_attempts_tpaga_charge", "tpaga_charge_id"),
        Index("ix_charge_attempts_finished", "finished_at"),
    )
    id: Mapped[BigId]
    invoice_id: Mapped[int] = _fk("invoices.id")
    attempt_number: Mapped[int]
    order_id: Mapped[str] = mapped_column(String(64), unique=True)
    card_id: Mapped[int] = _fk("cards.id")
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    state: Mapped[str] = mapped_column(String(16))
    tpaga_charge_id: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(String(255))
    decline_class: Mapped[str | None] = mapped_column(String(16))
    http_status: Mapped[int | None]
    authorization_code: Mapped[str | None] = mapped_column(String(64))
    unknown_reason: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Refund(Base):
    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("charge_attempt_id", name="uq_refunds_charge_attempt"),
        CheckConstraint("state in ('requested', 'sending', 'voided', 'rejected', 'expired', 'unknown')", name="state"),
        Index(
            "ix_refunds_due",
            "deadline_at",
            postgresql_where=text("state in ('requested', 'sending')"),
            sqlite_where=text("state in ('requested', 'sending')"),
        ),
    )
    id: Mapped[BigId]
    charge_attempt_id: Mapped[int] = _fk("charge_attempts.id")
    invoice_id: Mapped[int] = _fk("invoices.id")
    reason: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    deadline_at: Mapped[Timestamp]
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    http_status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(String(255))
    requested_at: Mapped[Timestamp]
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class OutboxMessage(Base):
    """A task intent written in the same transaction as the state change it follows from."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(
            "ix_outbox_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )
    id: Mapped[BigId]
    task_name: Mapped[str] = mapped_column(String(128))
    kwargs: Mapped[dict[str, Any]]
    created_at: Mapped[Timestamp]
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    publish_attempts: Mapped[int] = mapped_column(default=0)


class Event(Base):
    """Append-only log of what happened, for operators and audits."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_invoice", "invoice_id"),
        Index("ix_events_at", "at"),
    )
    id: Mapped[BigId]
    at: Mapped[Timestamp]
    kind: Mapped[str] = mapped_column(String(64))
    subscription_id: Mapped[int | None] = mapped_column(BigInteger)
    invoice_id: Mapped[int | None] = mapped_column(BigInteger)
    attempt_id: Mapped[int | None] = mapped_column(BigInteger)
    refund_id: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


__all__ = [
    "Base",
    "Card",
    "ChargeAttempt",
    "Control",
    "Customer",
    "Event",
    "Invoice",
    "OutboxMessage",
    "Plan",
    "Refund",
    "Subscription",
    "UTCDateTime",
]
