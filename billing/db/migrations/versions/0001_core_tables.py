"""Core tables: control, customers, cards, plans, subscriptions, invoices, charge attempts.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Hand-checked against `alembic revision --autogenerate` for billing/db/models.py. Self-contained on
purpose (no billing imports): `billing.db.models.UTCDateTime` is stored as DateTime(timezone=True), and
every constraint/index name is the final one produced by the models' naming convention (hence op.f()).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    """BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements (rowid)."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "control",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_control")),
    )
    op.create_table(
        "customers",
        sa.Column("id", _id(), nullable=False),
        sa.Column("tpaga_customer_id", sa.String(length=64), nullable=True),
        sa.Column("merchant_customer_id", sa.String(length=128), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("first_name", sa.String(length=128), nullable=True),
        sa.Column("last_name", sa.String(length=128), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
        sa.UniqueConstraint("merchant_customer_id", name=op.f("uq_customers_merchant_customer_id")),
        sa.UniqueConstraint("tpaga_customer_id", name=op.f("uq_customers_tpaga_customer_id")),
    )
    op.create_table(
        "plans",
        sa.Column("id", _id(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("interval", sa.String(length=8), nullable=False),
        sa.Column("interval_count", sa.Integer(), nullable=False),
        sa.Column("trial_days", sa.Integer(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_plans_amount_positive")),
        sa.CheckConstraint("interval_count >= 1", name=op.f("ck_plans_interval_count_positive")),
        sa.CheckConstraint("trial_days >= 0", name=op.f("ck_plans_trial_days_nonnegative")),
        sa.CheckConstraint("interval in ('day', 'week', 'month', 'year')", name=op.f("ck_plans_interval")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
        sa.UniqueConstraint("code", name=op.f("uq_plans_code")),
    )
    op.create_table(
        "cards",
        sa.Column("id", _id(), nullable=False),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("tpaga_card_id", sa.String(length=64), nullable=False),
        sa.Column("brand", sa.String(length=32), nullable=True),
        sa.Column("last_four", sa.String(length=4), nullable=True),
        sa.Column("exp_month", sa.Integer(), nullable=True),
        sa.Column("exp_year", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("unusable_code", sa.String(length=16), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.CheckConstraint("status in ('usable', 'unusable')", name=op.f("ck_cards_status")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_cards_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cards")),
        sa.UniqueConstraint("tpaga_card_id", name=op.f("uq_cards_tpaga_card_id")),
    )
    op.create_index("ix_cards_customer_status", "cards", ["customer_id", "status"], unique=False)

    op.create_table(
        "subscriptions",
        sa.Column("id", _id(), nullable=False),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("plan_id", _id(), nullable=False),
        sa.Column("card_id", _id(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("anchor_at", _ts(), nullable=False),
        sa.Column("next_period_index", sa.Integer(), nullable=False),
        sa.Column("next_billing_at", _ts(), nullable=True),
        sa.Column("current_period_start", _ts(), nullable=True),
        sa.Column("current_period_end", _ts(), nullable=True),
        sa.Column("trial_end_at", _ts(), nullable=True),
        sa.Column("cancel_at", _ts(), nullable=True),
        sa.Column("canceled_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.CheckConstraint(
            "status in ('trialing', 'active', 'past_due', 'unpaid', 'canceled')",
            name=op.f("ck_subscriptions_status"),
        ),
        sa.ForeignKeyConstraint(["card_id"], ["cards.id"], name=op.f("fk_subscriptions_card_id_cards")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_subscriptions_customer_id_customers")
        ),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_subscriptions_plan_id_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index(
        "ix_subscriptions_due",
        "subscriptions",
        ["next_billing_at"],
        unique=False,
        postgresql_where=sa.text("next_billing_at IS NOT NULL"),
        sqlite_where=sa.text("next_billing_at IS NOT NULL"),
    )
    op.create_index("ix_subscriptions_customer", "subscriptions", ["customer_id"], unique=False)

    op.create_table(
        "invoices",
        sa.Column("id", _id(), nullable=False),
        sa.Column("subscription_id", _id(), nullable=False),
        sa.Column("period_index", sa.Integer(), nullable=False),
        sa.Column("period_start", _ts(), nullable=False),
        sa.Column("period_end", _ts(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("due_at", _ts(), nullable=True),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("soft_failures", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", _ts(), nullable=True),
        sa.Column("last_error_code", sa.String(length=16), nullable=True),
        sa.Column("review_reason", sa.String(length=255), nullable=True),
        sa.Column("paid_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.CheckConstraint(
            "state in ('open', 'paid', 'review', 'uncollectible', 'void')", name=op.f("ck_invoices_state")
        ),
        sa.CheckConstraint("amount_minor > 0", name=op.f("ck_invoices_amount_positive")),
        sa.ForeignKeyConstraint(
            ["subscription_id"], ["subscriptions.id"], name=op.f("fk_invoices_subscription_id_subscriptions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        # One invoice per subscription period (invariant 1).
        sa.UniqueConstraint("subscription_id", "period_index", name=op.f("uq_invoices_subscription_period")),
    )
    op.create_index(
        "ix_invoices_due",
        "invoices",
        ["due_at"],
        unique=False,
        postgresql_where=sa.text("state = 'open' AND due_at IS NOT NULL"),
        sqlite_where=sa.text("state = 'open' AND due_at IS NOT NULL"),
    )
    op.create_index(
        "ix_invoices_review",
        "invoices",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("state = 'review'"),
        sqlite_where=sa.text("state = 'review'"),
    )
    op.create_index("ix_invoices_state", "invoices", ["state"], unique=False)

    op.create_table(
        "charge_attempts",
        sa.Column("id", _id(), nullable=False),
        sa.Column("invoice_id", _id(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("card_id", _id(), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("tpaga_charge_id", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=16), nullable=True),
        sa.Column("error_message", sa.String(length=255), nullable=True),
        sa.Column("decline_class", sa.String(length=16), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("authorization_code", sa.String(length=64), nullable=True),
        sa.Column("unknown_reason", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("sent_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("approved_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "state in ('pending', 'sending', 'approved', 'declined', 'unknown', 'not_sent')",
            name=op.f("ck_charge_attempts_state"),
        ),
        sa.ForeignKeyConstraint(["card_id"], ["cards.id"], name=op.f("fk_charge_attempts_card_id_cards")),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_charge_attempts_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_charge_attempts")),
        sa.UniqueConstraint("invoice_id", "attempt_number", name=op.f("uq_charge_attempts_invoice_number")),
        sa.UniqueConstraint("order_id", name=op.f("uq_charge_attempts_order_id")),
    )
    # Invariant 1: at most one approved attempt per invoice.
    op.create_index(
        "uq_charge_attempts_one_approved",
        "charge_attempts",
        ["invoice_id"],
        unique=True,
        postgresql_where=sa.text("state = 'approved'"),
        sqlite_where=sa.text("state = 'approved'"),
    )
    # Invariant 3: at most one attempt in flight or unresolved per invoice.
    op.create_index(
        "uq_charge_attempts_one_open",
        "charge_attempts",
        ["invoice_id"],
        unique=True,
        postgresql_where=sa.text("state in ('pending', 'sending', 'unknown')"),
        sqlite_where=sa.text("state in ('pending', 'sending', 'unknown')"),
    )
    op.create_index(
        "ix_charge_attempts_inflight",
        "charge_attempts",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state in ('pending', 'sending')"),
        sqlite_where=sa.text("state in ('pending', 'sending')"),
    )
    op.create_index(
        "ix_charge_attempts_unknown",
        "charge_attempts",
        ["id"],
        unique=False,
        postgresql_where=sa.text("state = 'unknown'"),
        sqlite_where=sa.text("state = 'unknown'"),
    )
    op.create_index("ix_charge_attempts_tpaga_charge", "charge_attempts", ["tpaga_charge_id"], unique=False)
    op.create_index("ix_charge_attempts_finished", "charge_attempts", ["finished_at"], unique=False)


def downgrade() -> None:
    # Dropping a table drops its indexes too.
    op.drop_table("charge_attempts")
    op.drop_table("invoices")
    op.drop_table("subscriptions")
    op.drop_table("cards")
    op.drop_table("plans")
    op.drop_table("customers")
    op.drop_table("control")
