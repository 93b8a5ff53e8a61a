"""Commands by the sending app's own ids: external ids, the command ledger, card tokens, pauses.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Only new tables, nullable columns and indexes: nothing is rewritten, so it runs on a live database.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_COLUMNS: dict[str, tuple[tuple[str, Any], ...]] = {
    "customers": (
        ("phone", sa.String(length=32)),
        ("updated_at", sa.DateTime(timezone=True)),
        ("last_issued_at", sa.DateTime(timezone=True)),
        ("tpaga_lease_expires_at", sa.DateTime(timezone=True)),
    ),
    "plans": (("last_issued_at", sa.DateTime(timezone=True)),),
    "subscriptions": (
        ("external_id", sa.String(length=64)),
        ("paused_at", sa.DateTime(timezone=True)),
        ("resumes_at", sa.DateTime(timezone=True)),
        ("terms_hash", sa.String(length=64)),
        ("last_issued_at", sa.DateTime(timezone=True)),
    ),
}


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    for table, columns in NEW_COLUMNS.items():
        for name, type_ in columns:
            op.add_column(table, sa.Column(name, type_, nullable=True))
    op.create_index("uq_subscriptions_external_id", "subscriptions", ["external_id"], unique=True)
    op.create_index(
        "ix_subscriptions_resumes",
        "subscriptions",
        ["resumes_at"],
        postgresql_where=sa.text("resumes_at IS NOT NULL"),
        sqlite_where=sa.text("resumes_at IS NOT NULL"),
    )
    op.create_table(
        "card_tokens",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("customer_id", _id(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("card_id", _id(), nullable=True),
        sa.Column("error", sa.String(length=255), nullable=True),
        sa.Column("issued_at", _ts(), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.CheckConstraint("state in ('pending', 'attached', 'refused', 'unknown')", name=op.f("ck_card_tokens_state")),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], name=op.f("fk_card_tokens_customer_id_customers")),
        sa.ForeignKeyConstraint(["card_id"], ["cards.id"], name=op.f("fk_card_tokens_card_id_cards")),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_card_tokens")),
    )
    op.create_table(
        "commands",
        sa.Column("id", _id(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("params_sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("issued_at", _ts(), nullable=True),
        sa.Column("recorded_at", _ts(), nullable=False),
        sa.CheckConstraint("status in ('applied', 'rejected', 'stale')", name=op.f("ck_commands_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
        sa.UniqueConstraint("request_id", name=op.f("uq_commands_request_id")),
    )
    op.create_index("ix_commands_recorded", "commands", ["recorded_at"])
    op.create_table(
        "command_waits",
        sa.Column("task_id", sa.String(length=155), nullable=False),
        sa.Column("first_seen_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_command_waits")),
    )


def downgrade() -> None:
    op.drop_table("command_waits")
    op.drop_index("ix_commands_recorded", table_name="commands")
    op.drop_table("commands")
    op.drop_table("card_tokens")
    op.drop_index("ix_subscriptions_resumes", table_name="subscriptions")
    op.drop_index("uq_subscriptions_external_id", table_name="subscriptions")
    for table, columns in NEW_COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for name, _ in reversed(columns):
                batch.drop_column(name)
