"""Maintained counts for the metrics exporter: metric_deltas (append-only, written by triggers) and metric_totals;
an index for the nearest deadline of an unknown refund.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

It comes after 0007 and 0008, so 0007's downgrade, which rebuilds invoices and charge_attempts on SQLite, runs
only after this one has dropped its triggers.

Triggers on invoices, charge_attempts, refunds, subscriptions and deliveries append signed rows to
metric_deltas in the transaction that changes a counted column, whatever wrote it (the services, the bulk SQL of
billing.db.bulk, an operator's psql): a rolled-back change leaves no delta. On PostgreSQL they are statement-level
triggers over the statement's transition tables, so a batch UPDATE of 1,000 invoices appends one row per label
set, not 1,000. On SQLite they are row-level. The upgrade backfills metric_totals from the existing rows (one scan
of each table, once).

A SQLite table rebuild (`op.batch_alter_table`) drops that table's triggers: a later migration that rebuilds one
of these tables must create its triggers again (`create_triggers(bind, [table])`). TRUNCATE fires no row
trigger: after truncating one of these tables, rebuild the totals with `billing.services.metrics.rebuild_totals`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of what billing.services.metrics counts (a migration must not change when the code does):
# table -> (the counted columns, the key rows of one table row `r`: metric, k1, k2, k3, condition).
FINISHED = "('approved', 'declined', 'duplicate', 'not_sent')"
COUNTED: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str, str, str, str], ...]]] = {
    "invoices": (
        ("state", "last_error_code"),
        (
            ("'invoices'", "r.state", "''", "''", "1 = 1"),
            ("'recovered'", "''", "''", "''", "r.state = 'paid' AND r.last_error_code IS NOT NULL"),
        ),
    ),
    "charge_attempts": (
        ("state", "error_code", "decline_class"),
        (
            (
                "'attempts'",
                "r.state",
                "COALESCE(r.error_code, '')",
                "COALESCE(r.decline_class, '')",
                f"r.state IN {FINISHED}",
            ),
        ),
    ),
    "refunds": (("state",), (("'refunds'", "r.state", "''", "''", "1 = 1"),)),
    "subscriptions": (
        ("status", "paused_at", "plan_id"),
        (
            (
                "'paying'",
                "CAST(r.plan_id AS TEXT)",
                "''",
                "''",
                "r.status IN ('active', 'past_due') AND r.paused_at IS NULL",
            ),
        ),
    ),
    "deliveries": (("state", "endpoint_id"), (("'backlog'", "CAST(r.endpoint_id AS TEXT)", "''", "''", "r.state = 'pending'"),)),
}
COLUMNS = "metric, k1, k2, k3"


def key_rows(table: str, source: str, sign: str) -> str:
    """SELECTs of (metric, k1, k2, k3, d) for the rows of `source` (a table, a transition table, or '' for
    SQLite's OLD/NEW row named `r` by the caller's substitution)."""
    selects = []
    for metric, k1, k2, k3, where in COUNTED[table][1]:
        selects.append(f"SELECT {metric} AS metric, {k1} AS k1, {k2} AS k2, {k3} AS k3, {sign} AS d{source} WHERE {where}")
    return " UNION ALL ".join(selects)


def grouped_insert(rows: str) -> str:
    return (
        f"INSERT INTO metric_deltas ({COLUMNS}, delta) SELECT {COLUMNS}, sum(d) FROM ({rows}) AS x "
        f"GROUP BY {COLUMNS} HAVING sum(d) <> 0"
    )


def _pg_function(table: str) -> str:
    new, old = key_rows(table, " FROM new_rows r", "1"), key_rows(table, " FROM old_rows r", "-1")
    return f"""
CREATE FUNCTION metric_deltas_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {grouped_insert(new)};
    ELSIF TG_OP = 'DELETE' THEN
        {grouped_insert(old)};
    ELSE
        {grouped_insert(f"{old} UNION ALL {new}")};
    END IF;
    RETURN NULL;
END $$"""


def _pg_triggers(table: str) -> list[str]:
    # A trigger with transition tables takes one event (and no column list), hence three.
    return [
        _pg_function(table),
        f"CREATE TRIGGER metric_{table}_ins AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION metric_deltas_{table}()",
        f"CREATE TRIGGER metric_{table}_upd AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows "
        f"NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION metric_deltas_{table}()",
        f"CREATE TRIGGER metric_{table}_del AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION metric_deltas_{table}()",
    ]


def _sqlite_row(table: str, row: str, sign: str) -> str:
    return key_rows(table, "", sign).replace("r.", f"{row}.")


def _sqlite_triggers(table: str) -> list[str]:
    columns = COUNTED[table][0]
    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in columns)
    new, old = _sqlite_row(table, "NEW", "1"), _sqlite_row(table, "OLD", "-1")
    return [
        f"CREATE TRIGGER metric_{table}_ins AFTER INSERT ON {table} BEGIN {grouped_insert(new)}; END",
        f"CREATE TRIGGER metric_{table}_upd AFTER UPDATE ON {table} WHEN {changed} "
        f"BEGIN {grouped_insert(f'{old} UNION ALL {new}')}; END",
        f"CREATE TRIGGER metric_{table}_del AFTER DELETE ON {table} BEGIN {grouped_insert(old)}; END",
    ]


def create_triggers(bind: sa.Connection, tables: Sequence[str] = tuple(COUNTED)) -> None:
    for table in tables:
        statements = _pg_triggers(table) if bind.dialect.name == "postgresql" else _sqlite_triggers(table)
        for statement in statements:
            bind.exec_driver_sql(statement)


def drop_triggers(bind: sa.Connection) -> None:
    for table in COUNTED:
        for event in ("ins", "upd", "del"):
            bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS metric_{table}_{event}" + (
                f" ON {table}" if bind.dialect.name == "postgresql" else ""
            ))
        if bind.dialect.name == "postgresql":
            bind.exec_driver_sql(f"DROP FUNCTION IF EXISTS metric_deltas_{table}()")


def backfill(bind: sa.Connection) -> None:
    """metric_totals from the rows as they are: one scan of each counted table."""
    for table in COUNTED:
        rows = key_rows(table, f" FROM {table} r", "1")
        bind.exec_driver_sql(
            f"INSERT INTO metric_totals ({COLUMNS}, total) SELECT {COLUMNS}, sum(d) FROM ({rows}) AS x "
            f"GROUP BY {COLUMNS}"
        )


def upgrade() -> None:
    key = [sa.Column(name, sa.String(length=length), nullable=False) for name, length in _KEY]
    op.create_table(
        "metric_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        *key,
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_deltas")),
    )
    op.create_table(
        "metric_totals",
        *[sa.Column(name, sa.String(length=length), nullable=False) for name, length in _KEY],
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("metric", "k1", "k2", "k3", name=op.f("pk_metric_totals")),
    )
    # The exporter's nearest refund deadline reads this and ix_refunds_due: no scan of refunds either.
    op.create_index(
        "ix_refunds_unknown_deadline",
        "refunds",
        ["deadline_at"],
        postgresql_where=sa.text("state = 'unknown'"),
        sqlite_where=sa.text("state = 'unknown'"),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # The backfill and the triggers see the same rows: no writer may change a counted table in between.
        bind.exec_driver_sql("LOCK TABLE " + ", ".join(COUNTED) + " IN SHARE ROW EXCLUSIVE MODE")
    backfill(bind)
    create_triggers(bind)


_KEY = (("metric", 16), ("k1", 32), ("k2", 32), ("k3", 32))


def downgrade() -> None:
    drop_triggers(op.get_bind())
    op.drop_index("ix_refunds_unknown_deadline", table_name="refunds")
    op.drop_table("metric_totals")
    op.drop_table("metric_deltas")
