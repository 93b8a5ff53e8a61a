"""Deliveries are claimed by a lease column outside the indexes.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

A nullable column and a storage parameter only: nothing is rewritten, so it runs on a live database.

Why: the claim used to push `next_attempt_at` (indexed by ix_deliveries_due) a lease ahead, so every claim was
a non-HOT update that added an entry to both partial indexes and left a dead one behind; the pass's claim
scanned those dead entries (up to 5 s per pass in the benchmark). `claimed_until` is in no index, and pages
kept half free (fillfactor) leave room for the claimed version of each row on its own page, so a claim is a
HOT update (PostgreSQL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
# The brief said 0009 after 0005; main has 0007-0009 since (two heads would make `upgrade head` fail).
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # Applies to pages written from now on (existing ones are not rewritten).
        op.execute("ALTER TABLE deliveries SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE deliveries RESET (fillfactor)")
    # A plain DROP COLUMN (SQLite 3.35+), not batch_alter_table: a batch rebuild on SQLite would drop the
    # metric triggers 0009 put on deliveries.
    op.execute("ALTER TABLE deliveries DROP COLUMN claimed_until")
