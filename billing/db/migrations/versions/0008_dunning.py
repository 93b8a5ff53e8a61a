"""Dunning counts a card's recent declines: an index on charge_attempts (card_id, finished_at).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

An index only. The colombia dunning policy stops retrying a card declined 15 times in 30 days (the card
networks' excessive-retry rules), counted at each decision; without the index that count reads every attempt
of the last 30 days of all cards.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_charge_attempts_card_finished", "charge_attempts", ["card_id", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_charge_attempts_card_finished", table_name="charge_attempts")
