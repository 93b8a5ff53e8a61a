"""A plan's tax treatment, each invoice's base and tax, and Tpaga's settlement figures on each attempt.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-02

Existing plans become `excluded` at rate 0: that is what they sent until now (`taxAmount` 0, no
`iacAmount`). Invoice and attempt columns are nullable: rows written before this revision have no tax line
and no settlement figures, and the settlement report counts their tax as unknown (0).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INVOICE_COLUMNS = ("tax_treatment", "tax_rate", "base_minor", "tax_minor")
_SETTLEMENT_COLUMNS = (
    "tax_amount_minor",
    "iac_amount_minor",
    "fee_minor",
    "rete_renta_minor",
    "rete_ica_minor",
    "rete_iva_minor",
    "net_minor",
    "payment_transaction",
    "tpaga_created_at",
)


def upgrade() -> None:
    op.add_column(
        "plans", sa.Column("tax_treatment", sa.String(length=16), nullable=False, server_default="excluded")
    )
    op.add_column("plans", sa.Column("tax_rate", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("invoices", sa.Column("tax_treatment", sa.String(length=16), nullable=True))
    op.add_column("invoices", sa.Column("tax_rate", sa.Integer(), nullable=True))
    op.add_column("invoices", sa.Column("base_minor", sa.BigInteger(), nullable=True))
    op.add_column("invoices", sa.Column("tax_minor", sa.BigInteger(), nullable=True))
    for name in _SETTLEMENT_COLUMNS[:-2]:
        op.add_column("charge_attempts", sa.Column(name, sa.BigInteger(), nullable=True))
    op.add_column("charge_attempts", sa.Column("payment_transaction", sa.String(length=64), nullable=True))
    op.add_column("charge_attempts", sa.Column("tpaga_created_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("charge_attempts") as batch:
        for name in reversed(_SETTLEMENT_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("invoices") as batch:
        for name in reversed(_INVOICE_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("tax_rate")
        batch.drop_column("tax_treatment")
