"""The outbound event stream: its events, endpoints and deliveries, and the advance notices already sent.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

New tables and nullable columns only.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("subscriptions", sa.Column("renewal_noticed_index", sa.Integer(), nullable=True))
    op.add_column("subscriptions", sa.Column("trial_noticed_at", _ts(), nullable=True))
    op.add_column("cards", sa.Column("expiry_noticed_at", _ts(), nullable=True))
    op.create_table(
        "stream_events",
        sa.Column("id", _id(), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=48), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("stream_offset", sa.BigInteger(), nullable=True),
        sa.Column("customer_id", sa.BigInteger(), nullable=True),
        sa.Column("subscription_id", sa.BigInteger(), nullable=True),
        sa.Column("subscription_seq", sa.Integer(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stream_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_stream_events_event_id")),
        sa.UniqueConstraint("stream_offset", name=op.f("uq_stream_events_stream_offset")),
        sa.UniqueConstraint("subscription_id", "subscription_seq", name=op.f("uq_stream_events_subscription_seq")),
    )
    op.create_index(
        "ix_stream_events_unsequenced",
        "stream_events",
        ["id"],
        postgresql_where=sa.text("stream_offset IS NULL"),
        sqlite_where=sa.text("stream_offset IS NULL"),
    )
    op.create_index("ix_stream_events_created", "stream_events", ["created_at"])
    op.create_table(
        "endpoints",
        sa.Column("id", _id(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.String(length=512), nullable=True),
        sa.Column("event_types", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("failing_since", _ts(), nullable=True),
        sa.Column("from_offset", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("removed_at", _ts(), nullable=True),
        sa.CheckConstraint("kind in ('webhook', 'celery')", name=op.f("ck_endpoints_kind")),
        sa.CheckConstraint("status in ('active', 'failing')", name=op.f("ck_endpoints_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_endpoints")),
    )
    op.create_table(
        "deliveries",
        sa.Column("endpoint_id", _id(), nullable=False),
        sa.Column("stream_offset", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _ts(), nullable=False),
        sa.Column("last_error", sa.String(length=255), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("delivered_at", _ts(), nullable=True),
        sa.CheckConstraint("state in ('pending', 'delivered')", name=op.f("ck_deliveries_state")),
        sa.ForeignKeyConstraint(["endpoint_id"], ["endpoints.id"], name=op.f("fk_deliveries_endpoint_id_endpoints")),
        sa.PrimaryKeyConstraint("endpoint_id", "stream_offset", name=op.f("pk_deliveries")),
    )
    for name, columns in (
        ("ix_deliveries_heads", ["endpoint_id", "key", "stream_offset"]),
        ("ix_deliveries_due", ["next_attempt_at"]),
    ):
        op.create_index(
            name,
            "deliveries",
            columns,
            postgresql_where=sa.text("state = 'pending'"),
            sqlite_where=sa.text("state = 'pending'"),
        )


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("endpoints")
    op.drop_index("ix_stream_events_created", table_name="stream_events")
    op.drop_index("ix_stream_events_unsequenced", table_name="stream_events")
    op.drop_table("stream_events")
    with op.batch_alter_table("cards") as batch:
        batch.drop_column("expiry_noticed_at")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("trial_noticed_at")
        batch.drop_column("renewal_noticed_index")
