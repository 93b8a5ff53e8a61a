"""SQLAlchemy 2.0 typed models. Every constraint is named; indexes make worker queries O(work found)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
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

from billing.domain.declines import DeclineClass
from billing.domain.periods import Interval
from billing.domain.states import AttemptState, CardStatus, InvoiceState, RefundState, SubscriptionStatus
from billing.domain.tax import TaxTreatment

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


def _sql_literal(member: StrEnum) -> str:
    # The values are identifiers chosen in billing.domain; a quote would need escaping nobody wrote.
    if "'" in member.value:
        raise ValueError(f"enum value {member.value!r} cannot be written as a plain SQL literal")
    return f"'{member.value}'"


def sql_in(column: str, members: Iterable[StrEnum]) -> str:
    """`column in ('a', 'b')`, the SQL spelling of "one of these enum values"."""
    return f"{column} in ({', '.join(_sql_literal(m) for m in members)})"


def sql_one_of(column: str, *members: StrEnum) -> str:
    """A predicate for index WHERE clauses: `column = 'a'` for one value, `column in (...)` for several."""
    if not members:
        raise ValueError("sql_one_of needs at least one value")
    if len(members) == 1:
        return f"{column} = {_sql_literal(members[0])}"
    return sql_in(column, members)


def enum_check(column: str, enum: type[StrEnum]) -> CheckConstraint:
    """The CHECK that keeps `column` to the values of `enum`, named after the column (ck_<table>_<column>)."""
    return CheckConstraint(sql_in(column, enum), name=column)


def partial_index(name: str, *columns: str, where: str, unique: bool = False) -> Index:
    """An index over the rows matching `where`, on PostgreSQL and SQLite alike."""
    predicate = text(where)
    return Index(name, *columns, unique=unique, postgresql_where=predicate, sqlite_where=predicate)


def _enum_values(enum: type[StrEnum]) -> list[str]:
    return [member.value for member in enum]


def enum_column(enum: type[StrEnum], length: int = 16, **kw: Any) -> Any:
    """A VARCHAR(length) column read and written as members of `enum`, stored by value.

    Writing a string outside the enum fails before SQL is sent; the CHECK constraint, when the table has
    one, is declared with `enum_check` so that its name and text stay those of the migrations.
    """
    longest = max(len(value) for value in _enum_values(enum))
    if longest > length:
        raise ValueError(f"{enum.__name__} has a value of {longest} characters, longer than the column's {length}")
    column_type = Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        values_callable=_enum_values,
        validate_strings=True,
        length=length,
    )
    return mapped_column(column_type, **kw)


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
    # Columns of migration 0004 follow, in its order (the migration test compares column order).
    phone: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The newest `issued_at` of a command applied to this customer: an older one is stale.
    last_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # While tpaga_customer_id is null the customer is pending at Tpaga: the worker whose lease this is calls
    # Tpaga; a duplicate command waits for it instead of creating a second Tpaga customer.
    tpaga_lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Card(Base):
    __tablename__ = "cards"
    __table_args__ = (
        enum_check("status", CardStatus),
        Index("ix_cards_customer_status", "customer_id", "status"),
    )
    id: Mapped[BigId]
    customer_id: Mapped[int] = _fk("customers.id")
    tpaga_card_id: Mapped[str] = mapped_column(String(64), unique=True)
    brand: Mapped[str | None] = mapped_column(String(32))
    last_four: Mapped[str | None] = mapped_column(String(4))
    exp_month: Mapped[int | None]
    exp_year: Mapped[int | None]
    status: Mapped[CardStatus] = enum_column(CardStatus, default=CardStatus.USABLE)
    unusable_code: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[Timestamp]
    # Migration 0005: when card.expiring was emitted for this card.
    expiry_noticed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def __repr__(self) -> str:
        return f"Card(id={self.id}, brand={self.brand}, last_four={self.last_four}, status={self.status})"


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("interval_count >= 1", name="interval_count_positive"),
        CheckConstraint("trial_days >= 0", name="trial_days_nonnegative"),
        enum_check("interval", Interval),
    )
    id: Mapped[BigId]
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    interval: Mapped[Interval] = enum_column(Interval, length=8)
    interval_count: Mapped[int] = mapped_column(default=1)
    trial_days: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[Timestamp]
    last_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Migration 0007: how the (tax-inclusive) price is taxed; plans made before it are `excluded` at 0 %.
    # No CHECK in the schema: the enum is enforced on write by the column type, the rate by billing.domain.tax.
    tax_treatment: Mapped[TaxTreatment] = enum_column(
        TaxTreatment, default=TaxTreatment.EXCLUDED, server_default=TaxTreatment.EXCLUDED.value
    )
    tax_rate: Mapped[int] = mapped_column(default=0, server_default="0")


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        enum_check("status", SubscriptionStatus),
        # Beat's scan: only subscriptions that will renew carry next_billing_at.
        partial_index("ix_subscriptions_due", "next_billing_at", where="next_billing_at IS NOT NULL"),
        Index("ix_subscriptions_customer", "customer_id"),
        # The resume scan: paused subscriptions with a date to resume on.
        partial_index("ix_subscriptions_resumes", "resumes_at", where="resumes_at IS NOT NULL"),
        # A unique index rather than a constraint: SQLite adds one to an existing table without a rebuild.
        Index("uq_subscriptions_external_id", "external_id", unique=True),
    )
    id: Mapped[BigId]
    customer_id: Mapped[int] = _fk("customers.id")
    plan_id: Mapped[int] = _fk("plans.id")
    card_id: Mapped[int | None] = _fk("cards.id")
    status: Mapped[SubscriptionStatus] = enum_column(SubscriptionStatus)
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
    # Columns of migration 0004 follow, in its order.
    # The sending app's own id (billing.create_subscription); null for subscriptions made by the CLI without one.
    external_id: Mapped[str | None] = mapped_column(String(64))
    # Paused: no invoice is opened (next_billing_at is null) and open invoices wait (due_at null).
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resumes_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A hash of the creating command's terms: the same external_id with other terms is refused.
    terms_hash: Mapped[str | None] = mapped_column(String(64))
    last_issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Columns of migration 0005: which advance notices the stream already carries (sent once each).
    renewal_noticed_index: Mapped[int | None]
    trial_noticed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("subscription_id", "period_index", name="uq_invoices_subscription_period"),
        enum_check("state", InvoiceState),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        # The charge scan: open invoices whose next attempt is scheduled.
        partial_index(
            "ix_invoices_due", "due_at", where=f"{sql_one_of('state', InvoiceState.OPEN)} AND due_at IS NOT NULL"
        ),
        partial_index("ix_invoices_review", "updated_at", where=sql_one_of("state", InvoiceState.REVIEW)),
        Index("ix_invoices_state", "state"),
    )
    id: Mapped[BigId]
    subscription_id: Mapped[int] = _fk("subscriptions.id")
    period_index: Mapped[int]
    period_start: Mapped[Timestamp]
    period_end: Mapped[Timestamp]
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    state: Mapped[InvoiceState] = enum_column(InvoiceState)
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # invoices.attempt_count stays in the schema (NOT NULL, no server default) but nothing reads it: the
    # attempts are the rows of charge_attempts. Mapped under a private name only so inserts still fill it.
    _attempt_count: Mapped[int] = mapped_column("attempt_count", default=0)
    soft_failures: Mapped[int] = mapped_column(default=0)
    first_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error_code: Mapped[str | None] = mapped_column(String(16))
    review_reason: Mapped[str | None] = mapped_column(String(255))
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    updated_at: Mapped[Timestamp]
    # Migration 0007: the invoice's tax lines, copied from its plan when opened (base + tax = amount).
    # Null on invoices opened before it (they sent no tax).
    tax_treatment: Mapped[TaxTreatment | None] = enum_column(TaxTreatment)
    tax_rate: Mapped[int | None]
    base_minor: Mapped[int | None] = mapped_column(BigInteger)
    tax_minor: Mapped[int | None] = mapped_column(BigInteger)


class ChargeAttempt(Base):
    __tablename__ = "charge_attempts"
    __table_args__ = (
        UniqueConstraint("invoice_id", "attempt_number", name="uq_charge_attempts_invoice_number"),
        enum_check("state", AttemptState),
        # Invariant 1 in the database: at most one approved attempt per invoice...
        partial_index(
            "uq_charge_attempts_one_approved",
            "invoice_id",
            unique=True,
            where=sql_one_of("state", AttemptState.APPROVED),
        ),
        # ...and at most one attempt in flight or unresolved per invoice (invariant 3).
        partial_index(
            "uq_charge_attempts_one_open",
            "invoice_id",
            unique=True,
            where=sql_one_of("state", AttemptState.PENDING, AttemptState.SENDING, AttemptState.UNKNOWN),
        ),
        partial_index(
            "ix_charge_attempts_inflight",
            "lease_expires_at",
            where=sql_one_of("state", AttemptState.PENDING, AttemptState.SENDING),
        ),
        partial_index("ix_charge_attempts_unknown", "id", where=sql_one_of("state", AttemptState.UNKNOWN)),
        Index("ix_charge_attempts_tpaga_charge", "tpaga_charge_id"),
        Index("ix_charge_attempts_finished", "finished_at"),
        # Dunning counts a card's declines of the last 30 days at each decision (the card networks' cap).
        Index("ix_charge_attempts_card_finished", "card_id", "finished_at"),
    )
    id: Mapped[BigId]
    invoice_id: Mapped[int] = _fk("invoices.id")
    attempt_number: Mapped[int]
    order_id: Mapped[str] = mapped_column(String(64), unique=True)
    card_id: Mapped[int] = _fk("cards.id")
    amount_minor: Mapped[AmountMinor]
    currency: Mapped[Currency]
    state: Mapped[AttemptState] = enum_column(AttemptState)
    tpaga_charge_id: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(16))
    error_message: Mapped[str | None] = mapped_column(String(255))
    # No CHECK in the schema for this one: the enum is enforced on write by the column type only.
    decline_class: Mapped[DeclineClass | None] = enum_column(DeclineClass)
    http_status: Mapped[int | None]
    authorization_code: Mapped[str | None] = mapped_column(String(64))
    unknown_reason: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Migration 0007: Tpaga's settlement figures of an approved charge, exactly as it returned them (minor
    # units); null on declines and on attempts approved before 0007.
    tax_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    iac_amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    fee_minor: Mapped[int | None] = mapped_column(BigInteger)
    rete_renta_minor: Mapped[int | None] = mapped_column(BigInteger)
    rete_ica_minor: Mapped[int | None] = mapped_column(BigInteger)
    rete_iva_minor: Mapped[int | None] = mapped_column(BigInteger)
    net_minor: Mapped[int | None] = mapped_column(BigInteger)
    payment_transaction: Mapped[str | None] = mapped_column(String(64))
    tpaga_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Refund(Base):
    __tablename__ = "refunds"
    __table_args__ = (
        UniqueConstraint("charge_attempt_id", name="uq_refunds_charge_attempt"),
        enum_check("state", RefundState),
        partial_index(
            "ix_refunds_due", "deadline_at", where=sql_one_of("state", RefundState.REQUESTED, RefundState.SENDING)
        ),
        # The exporter's nearest refund deadline: with ix_refunds_due, an index lookup instead of a scan.
        partial_index("ix_refunds_unknown_deadline", "deadline_at", where=sql_one_of("state", RefundState.UNKNOWN)),
    )
    id: Mapped[BigId]
    charge_attempt_id: Mapped[int] = _fk("charge_attempts.id")
    invoice_id: Mapped[int] = _fk("invoices.id")
    reason: Mapped[str] = mapped_column(String(255))
    state: Mapped[RefundState] = enum_column(RefundState)
    deadline_at: Mapped[Timestamp]
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    http_status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(String(255))
    requested_at: Mapped[Timestamp]
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class CardToken(Base):
    """One row per temporary card token ever given to billing.attach_card, keyed by the token's SHA-256 (never
    the token): written `pending` before Tpaga is called, so a duplicate delivery returns the first result
    instead of spending the single-use token twice."""

    __tablename__ = "card_tokens"
    __table_args__ = (CheckConstraint("state in ('pending', 'attached', 'refused', 'unknown')", name="state"),)
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[int] = _fk("customers.id")
    state: Mapped[str] = mapped_column(String(16))
    card_id: Mapped[int | None] = _fk("cards.id")
    error: Mapped[str | None] = mapped_column(String(255))
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[Timestamp]
    updated_at: Mapped[Timestamp]


class Command(Base):
    """Every outcome of a command from another app (billing.upsert_customer, ...): applied, rejected or stale,
    with its request_id (unique when given) and a hash of its parameters, written in the transaction of the
    change it made, so that a repeat returns the first outcome."""

    __tablename__ = "commands"
    __table_args__ = (
        CheckConstraint("status in ('applied', 'rejected', 'stale')", name="status"),
        Index("ix_commands_recorded", "recorded_at"),
    )
    id: Mapped[BigId]
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    params_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    recorded_at: Mapped[Timestamp]


class CommandWait(Base):
    """When a command that names an object not there yet was first seen (by its Celery task id, which its
    retries keep), so that it is retried for a bounded time from then and not from each retry."""

    __tablename__ = "command_waits"
    task_id: Mapped[str] = mapped_column(String(155), primary_key=True)
    first_seen_at: Mapped[Timestamp]


class StreamEvent(Base):
    """An event of the outbound stream (docs/events.md), written in the transaction of the change it reports.

    `stream_offset` (the event's `offset`) and `subscription_seq` are null until the sequencer
    (billing.services.stream) numbers the event: it numbers committed events only, one sequencer at a time, so
    offsets grow in the order events became visible and a consumer reading "offset > N" never misses one that
    committed late.
    """

    __tablename__ = "stream_events"
    __table_args__ = (
        UniqueConstraint("subscription_id", "subscription_seq", name="uq_stream_events_subscription_seq"),
        partial_index("ix_stream_events_unsequenced", "id", where="stream_offset IS NULL"),
        Index("ix_stream_events_created", "created_at"),
    )
    id: Mapped[BigId]
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(48))
    created_at: Mapped[Timestamp]
    # The event's `offset` in the stream ("offset" is an SQL keyword).
    stream_offset: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    customer_id: Mapped[int | None] = mapped_column(BigInteger)
    subscription_id: Mapped[int | None] = mapped_column(BigInteger)
    subscription_seq: Mapped[int | None]
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Endpoint(Base):
    """Where the stream is delivered: a webhook URL (Standard Webhooks signatures) or celery://QUEUE/TASK."""

    __tablename__ = "endpoints"
    __table_args__ = (
        CheckConstraint("kind in ('webhook', 'celery')", name="kind"),
        CheckConstraint("status in ('active', 'failing')", name="status"),
    )
    id: Mapped[BigId]
    url: Mapped[str] = mapped_column(String(2048))
    kind: Mapped[str] = mapped_column(String(16))
    secret: Mapped[str | None] = mapped_column(String(512))
    # Event types it receives (a JSON list), or null for all of them.
    event_types: Mapped[list[str] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="active")
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # It receives the events numbered after this offset (the stream's end when it was added).
    from_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[Timestamp]
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Delivery(Base):
    """One event for one endpoint: pending until the endpoint acknowledged it (2xx, or the broker took the
    message). Per endpoint and ordering key (the subscription, else the customer) only the lowest pending offset
    is sent, so event k+1 never reaches an endpoint before k was acknowledged there."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint("state in ('pending', 'delivered')", name="state"),
        partial_index("ix_deliveries_heads", "endpoint_id", "key", "stream_offset", where="state = 'pending'"),
        partial_index("ix_deliveries_due", "next_attempt_at", where="state = 'pending'"),
        # Half of each page free: room for a claimed row's new version on its page (a HOT update; migration 0010).
        {"postgresql_with": {"fillfactor": 50}},
    )
    endpoint_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("endpoints.id"), primary_key=True
    )
    stream_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[Timestamp]
    last_error: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[Timestamp]
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The claim's lease (a pass is sending it until then), in no index so that a claim is a HOT update.
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class OutboxMessage(Base):
    """A task intent written in the same transaction as the state change it follows from."""

    __tablename__ = "outbox"
    __table_args__ = (partial_index("ix_outbox_unpublished", "id", where="published_at IS NULL"),)
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


class MetricDelta(Base):
    """A signed change of one maintained count, appended by the database's triggers (migration 0009) in the
    transaction that changed the row: an insert, a change of the counted columns, a delete. Append-only so that
    concurrent charge transactions never wait on a shared counter row; `billing.services.metrics.fold` moves the
    rows into `metric_totals`. Keys: `metric` names the figure, k1..k3 its labels ('' when unused)."""

    __tablename__ = "metric_deltas"
    id: Mapped[BigId]
    metric: Mapped[str] = mapped_column(String(16))
    k1: Mapped[str] = mapped_column(String(32))
    k2: Mapped[str] = mapped_column(String(32))
    k3: Mapped[str] = mapped_column(String(32))
    delta: Mapped[int] = mapped_column(BigInteger)


class MetricTotal(Base):
    """The folded sum of `metric_deltas` per key: a count is its total plus the deltas not folded yet."""

    __tablename__ = "metric_totals"
    metric: Mapped[str] = mapped_column(String(16), primary_key=True)
    k1: Mapped[str] = mapped_column(String(32), primary_key=True)
    k2: Mapped[str] = mapped_column(String(32), primary_key=True)
    k3: Mapped[str] = mapped_column(String(32), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger)


__all__ = [
    "Base",
    "Card",
    "CardToken",
    "ChargeAttempt",
    "Command",
    "CommandWait",
    "Control",
    "Customer",
    "Delivery",
    "Endpoint",
    "Event",
    "Invoice",
    "MetricDelta",
    "MetricTotal",
    "OutboxMessage",
    "Plan",
    "Refund",
    "StreamEvent",
    "Subscription",
    "UTCDateTime",
    "enum_check",
    "enum_column",
    "partial_index",
    "sql_in",
    "sql_one_of",
]
