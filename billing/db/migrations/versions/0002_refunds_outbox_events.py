"""Refunds, the outbox and the event log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Hand-checked against `alembic revision --autogenerate` for billing/db/models.py (see 0001's notes).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    """BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements (rowid)."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "refunds",
        sa.Column("id", _id(), nullable=False),
        sa.Column("charge_attempt_id", _id(), nullable=False),
        sa.Column("invoice_id", _id(), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("deadline_at", _ts(), nullable=False),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=255), nullable=True),
        sa.Column("requested_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(
            "state in ('requested', 'sending', 'voided', 'rejected', 'expired', 'unknown')",
            name=op.f("ck_refunds_state"),
        ),
        sa.ForeignKeyConstraint(
            ["charge_attempt_id"],
            ["charge_attempts.id"],
            name=op.f("fk_refunds_charge_attempt_id_charge_attempts"),
        ),
        sa.ForeignKeyConstraint(["invoice_id"], ["invoices.id"], name=op.f("fk_refunds_invoice_id_invoices")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refunds")),
        # One refund per charge: a second request returns the first (invariant 4).
        sa.UniqueConstraint("charge_attempt_id", name=op.f("uq_refunds_charge_attempt")),
    )
    op.create_index(
        "ix_refunds_due",
        "refunds",
        ["deadline_at"],
        unique=False,
        postgresql_where=sa.text("state in ('requested', 'sending')"),
        sqlite_where=sa.text("state in ('requested', 'sending')"),
    )

    op.create_table(
        "outbox",
        sa.Column("id", _id(), nullable=False),
        sa.Column("task_name", sa.String(length=128), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("published_at", _ts(), nullable=True),
        sa.Column("publish_attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("published_at IS NULL"),
        sqlite_where=sa.text("published_at IS NULL"),
    )

    op.create_table(
        "events",
        sa.Column("id", _id(), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("subscription_id", sa.BigInteger(), nullable=True),
        sa.Column("invoice_id", sa.BigInteger(), nullable=True),
        sa.Column("attempt_id", sa.BigInteger(), nullable=True),
        sa.Column("refund_id", sa.BigInteger(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index("ix_events_invoice", "events", ["invoice_id"], unique=False)
    op.create_index("ix_events_at", "events", ["at"], unique=False)


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("outbox")
    op.drop_table("refunds")
