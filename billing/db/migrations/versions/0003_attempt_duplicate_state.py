"""Charge attempts may be `duplicate`: approved by Tpaga while another attempt of the invoice already was.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Only the CHECK list of charge_attempts.state changes. SQLite cannot alter a constraint in place, so the table is
rebuilt there (batch mode copies the rows and recreates its indexes); PostgreSQL drops and adds the constraint.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "state in ('pending', 'sending', 'approved', 'declined', 'unknown', 'not_sent')"
NEW = "state in ('pending', 'sending', 'approved', 'declined', 'unknown', 'not_sent', 'duplicate')"


def _replace(check: str) -> None:
    with op.batch_alter_table("charge_attempts", recreate="auto") as batch:
        batch.drop_constraint(op.f("ck_charge_attempts_state"), type_="check")
        batch.create_check_constraint(op.f("ck_charge_attempts_state"), check)


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    # A database that already holds duplicate attempts cannot go back: the old CHECK refuses them.
    _replace(OLD)
