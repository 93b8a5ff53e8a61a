"""Migrations shipped in the package: empty -> head, older -> head with data kept, models == migrations.

Runs on SQLite everywhere and on PostgreSQL when the server is there (each test gets a fresh schema
through search_path, see conftest.pg_url).
"""

from __future__ import annotations

import enum
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from billing.cli import main
from billing.db import migrate
from billing.db.engine import make_engine, normalize_url
from billing.db.models import (
    Base,
    Card,
    ChargeAttempt,
    Invoice,
    Plan,
    Subscription,
    enum_check,
    enum_column,
    partial_index,
    sql_in,
    sql_one_of,
)
from billing.domain.declines import DeclineClass
from billing.domain.periods import Interval
from billing.domain.states import AttemptState, CardStatus, InvoiceState, RefundState, SubscriptionStatus
from billing.domain.tax import TaxTreatment

HEAD = "0010"
CORE_TABLES = {"control", "customers", "cards", "plans", "subscriptions", "invoices", "charge_attempts"}
LATER_TABLES = {"refunds", "outbox", "events"}
T0 = "2026-01-31 12:00:00"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each dialect."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def reference_url(db_url: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty database of the same dialect as db_url, next to it (for Base.metadata.create_all)."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/reference.db"
        return
    import psycopg

    server = request.getfixturevalue("postgres_server_url")
    conninfo = server.replace("postgresql+psycopg://", "postgresql://")
    schema = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'create schema "{schema}"')
    sep = "&" if "?" in server else "?"
    yield f"{server}{sep}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'drop schema "{schema}" cascade')


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _execute(url: str, *statements: str) -> None:
    """Run SQL in one transaction with foreign keys enforced (make_engine turns them on for SQLite)."""
    engine = make_engine(url, poolclass=sa.pool.NullPool) if url.startswith("sqlite") else _engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _scalar(url: str, statement: str) -> Any:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(statement)).scalar()
    finally:
        engine.dispose()


def _seed_core(url: str) -> None:
    """One customer, card, plan, subscription, open invoice and declined attempt, in plain SQL."""
    _execute(
        url,
        f"INSERT INTO control (key, value, updated_at) VALUES ('clock_offset_seconds', '0.0', '{T0}')",
        "INSERT INTO customers (id, tpaga_customer_id, merchant_customer_id, email, created_at) "
        f"VALUES (1, 'tc-1', 'm-1', 'a@example.com', '{T0}')",
        "INSERT INTO cards (id, customer_id, tpaga_card_id, brand, last_four, status, created_at) "
        f"VALUES (1, 1, 'card-1', 'VISA', '4242', 'usable', '{T0}')",
        "INSERT INTO plans (id, code, name, amount_minor, currency, interval, interval_count, trial_days,"
        f" created_at) VALUES (1, 'basic', 'Basic', 2990000, 'COP', 'month', 1, 0, '{T0}')",
        "INSERT INTO subscriptions (id, customer_id, plan_id, card_id, status, anchor_at, next_period_index,"
        f" next_billing_at, created_at, updated_at) VALUES (1, 1, 1, 1, 'active', '{T0}', 1, '{T0}',"
        f" '{T0}', '{T0}')",
        "INSERT INTO invoices (id, subscription_id, period_index, period_start, period_end, amount_minor,"
        " currency, state, attempt_count, soft_failures, created_at, updated_at) VALUES"
        f" (1, 1, 0, '{T0}', '{T0}', 2990000, 'COP', 'open', 1, 0, '{T0}', '{T0}')",
        "INSERT INTO charge_attempts (id, invoice_id, attempt_number, order_id, card_id, amount_minor,"
        " currency, state, error_code, created_at) VALUES"
        f" (1, 1, 1, 'inv-1-1', 1, 2990000, 'COP', 'declined', '51', '{T0}')",
    )


def _attempt(attempt_id: int, number: int, state: str) -> str:
    return (
        "INSERT INTO charge_attempts (id, invoice_id, attempt_number, order_id, card_id, amount_minor,"
        f" currency, state, created_at) VALUES ({attempt_id}, 1, {number}, 'inv-1-{number}', 1, 2990000,"
        f" 'COP', '{state}', '{T0}')"
    )


# --- empty -> head, twice, concurrently ------------------------------------------------------------


def test_head_is_the_last_shipped_revision() -> None:
    assert migrate.head_revision() == HEAD
    assert migrate.heads() == (HEAD,)  # a second head means two migrations need merging


def test_upgrade_empty_database_to_head(db_url: str) -> None:
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == HEAD
    assert _tables(db_url) == set(Base.metadata.tables) | {"alembic_version"}
    if db_url.startswith("postgresql"):
        # alembic_version lands in the test's schema (first in search_path), not in public.
        # (Filtered by schema: other schemas of the shared database may hold their own alembic_version.)
        here = _scalar(
            db_url,
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_name = 'alembic_version' AND table_schema = current_schema()",
        )
        assert here == 1
        assert _scalar(db_url, "SELECT current_schema()") != "public"


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    migrate.upgrade(db_url)
    _seed_core(db_url)
    migrate.upgrade(db_url)
    migrate.upgrade(db_url, "head")
    assert migrate.current_revision(db_url) == HEAD
    assert _scalar(db_url, "SELECT count(*) FROM charge_attempts") == 1


def test_concurrent_upgrades_are_serialized(db_url: str) -> None:
    """Two deploys running the upgrade at once (processes: Alembic's context is process-global)."""
    code = "import sys; from billing.db.migrate import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    failures = [err for proc in procs if (err := proc.communicate(timeout=60)[1]) and proc.returncode != 0]
    assert failures == []
    assert all(proc.returncode == 0 for proc in procs)
    assert migrate.current_revision(db_url) == HEAD


def test_downgrade_to_base_and_back(db_url: str) -> None:
    migrate.upgrade(db_url)
    migrate.downgrade(db_url, "0001")
    assert _tables(db_url) == CORE_TABLES | {"alembic_version"}
    migrate.downgrade(db_url, "base")
    assert _tables(db_url) == {"alembic_version"}
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == HEAD


# --- older -> head keeps the data ------------------------------------------------------------------


def test_older_database_is_brought_to_head_with_its_data(db_url: str) -> None:
    migrate.upgrade(db_url, "0001")
    assert migrate.current_revision(db_url) == "0001"
    assert _tables(db_url) == CORE_TABLES | {"alembic_version"}
    _seed_core(db_url)

    migrate.upgrade(db_url)

    assert migrate.current_revision(db_url) == HEAD
    assert _tables(db_url) >= LATER_TABLES
    assert _scalar(db_url, "SELECT email FROM customers WHERE id = 1") == "a@example.com"
    assert _scalar(db_url, "SELECT amount_minor FROM plans WHERE code = 'basic'") == 2990000
    # 0007: a plan made before tax existed sent no tax, so it migrates as `excluded` at 0 %.
    assert _scalar(db_url, "SELECT tax_treatment FROM plans WHERE code = 'basic'") == "excluded"
    assert _scalar(db_url, "SELECT tax_rate FROM plans WHERE code = 'basic'") == 0
    assert _scalar(db_url, "SELECT tax_minor FROM invoices WHERE id = 1") is None
    assert _scalar(db_url, "SELECT fee_minor FROM charge_attempts WHERE order_id = 'inv-1-1'") is None
    assert _scalar(db_url, "SELECT error_code FROM charge_attempts WHERE order_id = 'inv-1-1'") == "51"
    assert _scalar(db_url, "SELECT value FROM control WHERE key = 'clock_offset_seconds'") == "0.0"
    # The new tables work with the old rows (foreign keys into 0001's tables).
    _execute(
        db_url,
        _attempt(2, 2, "approved"),
        "INSERT INTO refunds (charge_attempt_id, invoice_id, reason, state, deadline_at, requested_at)"
        f" VALUES (2, 1, 'customer asked', 'requested', '{T0}', '{T0}')",
        "INSERT INTO outbox (task_name, kwargs, created_at, publish_attempts)"
        f""" VALUES ('billing.execute_refund', '{{"refund_id": 1}}', '{T0}', 0)""",
        f"INSERT INTO events (at, kind, invoice_id, data) VALUES ('{T0}', 'refund.requested', 1, '{{}}')",
    )
    assert _scalar(db_url, "SELECT count(*) FROM refunds") == 1


def _seed_0002(url: str) -> None:
    """_seed_core plus a voided refund, an outbox message and an event: a database as 0002's code left it."""
    _seed_core(url)
    _execute(
        url,
        _attempt(2, 2, "approved"),
        "INSERT INTO refunds (id, charge_attempt_id, invoice_id, reason, state, deadline_at, requested_at)"
        f" VALUES (1, 2, 1, 'customer asked', 'voided', '{T0}', '{T0}')",
        "INSERT INTO outbox (task_name, kwargs, created_at, publish_attempts)"
        f""" VALUES ('billing.execute_refund', '{{"refund_id": 1}}', '{T0}', 0)""",
        f"INSERT INTO events (at, kind, attempt_id, data) VALUES ('{T0}', 'attempt.approved', 2, '{{}}')",
    )


def test_a_0002_database_keeps_its_rows_and_accepts_duplicate_attempts(db_url: str) -> None:
    migrate.upgrade(db_url, "0002")
    _seed_0002(db_url)
    with pytest.raises(IntegrityError):  # what 0002's CHECK does to the state the domain now has
        _execute(db_url, _attempt(3, 3, "duplicate"))

    migrate.upgrade(db_url)

    assert migrate.current_revision(db_url) == HEAD
    assert _scalar(db_url, "SELECT count(*) FROM charge_attempts") == 2
    assert _scalar(db_url, "SELECT error_code FROM charge_attempts WHERE order_id = 'inv-1-1'") == "51"
    assert _scalar(db_url, "SELECT state FROM charge_attempts WHERE id = 2") == "approved"
    assert _scalar(db_url, "SELECT charge_attempt_id FROM refunds WHERE id = 1") == 2
    assert _scalar(db_url, "SELECT count(*) FROM outbox") == 1
    _execute(db_url, _attempt(3, 3, "duplicate"))
    assert _scalar(db_url, "SELECT state FROM charge_attempts WHERE id = 3") == AttemptState.DUPLICATE
    with pytest.raises(IntegrityError):
        _execute(db_url, _attempt(4, 4, "bogus"))
    # The rebuilt table (SQLite) keeps its partial unique indexes and the foreign keys into it.
    with pytest.raises(IntegrityError):
        _execute(db_url, _attempt(4, 4, "approved"))
    with pytest.raises(IntegrityError):
        _execute(db_url, "UPDATE refunds SET charge_attempt_id = 99 WHERE id = 1")


def test_downgrade_from_0003_is_refused_while_a_duplicate_attempt_exists(db_url: str) -> None:
    migrate.upgrade(db_url)
    _seed_0002(db_url)
    _execute(db_url, _attempt(3, 3, "duplicate"))
    with pytest.raises(IntegrityError):
        migrate.downgrade(db_url, "0002")
    assert migrate.current_revision(db_url) == HEAD
    assert _scalar(db_url, "SELECT state FROM charge_attempts WHERE id = 3") == "duplicate"
    _execute(db_url, "UPDATE charge_attempts SET state = 'declined' WHERE id = 3")
    migrate.downgrade(db_url, "0002")
    assert migrate.current_revision(db_url) == "0002"
    assert _scalar(db_url, "SELECT count(*) FROM charge_attempts") == 3


# --- models and migrations agree ---------------------------------------------------------------------


def test_migrations_match_the_models(db_url: str) -> None:
    """`alembic check`: autogenerate finds nothing to change after upgrading to head.

    Nothing is ignored. Note that compare_metadata does not look at CHECK constraints nor at partial
    index predicates; test_migrated_structure_equals_create_all covers those.
    """
    migrate.upgrade(db_url)
    assert migrate.schema_diff(db_url) == []


def _structure(url: str) -> dict[str, Any]:
    """Everything reflection sees, as plain comparable values (alembic_version excluded)."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            out: dict[str, Any] = {}
            for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
                out[table] = {
                    "columns": [
                        (c["name"], str(c["type"].compile(engine.dialect)), c["nullable"], c.get("default"))
                        for c in insp.get_columns(table)
                    ],
                    "pk": insp.get_pk_constraint(table),
                    "fks": sorted(insp.get_foreign_keys(table), key=lambda fk: str(fk["name"])),
                    "uniques": sorted(
                        (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(table)
                    ),
                    "checks": sorted((str(c["name"]), str(c["sqltext"])) for c in insp.get_check_constraints(table)),
                    "indexes": sorted(
                        (
                            str(ix["name"]),
                            bool(ix["unique"]),
                            tuple(str(col) for col in ix["column_names"]),
                            sorted((k, str(v)) for k, v in ix.get("dialect_options", {}).items()),
                        )
                        for ix in insp.get_indexes(table)
                    ),
                }
            return out
    finally:
        engine.dispose()


def _create_all(url: str) -> None:
    engine = _engine(url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


def test_migrated_structure_equals_create_all(db_url: str, reference_url: str) -> None:
    """Column by column, constraint by constraint, index predicate by predicate: migrations == models."""
    migrate.upgrade(db_url)
    _create_all(reference_url)
    migrated, reference = _structure(db_url), _structure(reference_url)
    assert set(migrated) == set(Base.metadata.tables)
    for table in reference:
        assert migrated[table] == reference[table], table
    # The comparison really sees partial-index predicates and CHECK constraints.
    approved = [ix for ix in migrated["charge_attempts"]["indexes"] if ix[0] == "uq_charge_attempts_one_approved"]
    assert approved and approved[0][1] is True and "approved" in str(approved[0][3])
    assert any(name == "ck_plans_interval" for name, _ in migrated["plans"]["checks"])


def test_structure_comparison_catches_a_changed_partial_index(sqlite_url: str, tmp_path: Any) -> None:
    migrate.upgrade(sqlite_url)
    reference = f"sqlite:///{tmp_path}/reference.db"
    _create_all(reference)
    _execute(
        sqlite_url,
        "DROP INDEX uq_charge_attempts_one_approved",
        "CREATE UNIQUE INDEX uq_charge_attempts_one_approved ON charge_attempts (invoice_id) WHERE state = 'paid'",
    )
    assert migrate.schema_diff(sqlite_url) == []  # alembic alone does not see it...
    assert _structure(sqlite_url) != _structure(reference)  # ...this comparison does


# --- status columns typed by the domain enums --------------------------------------------------------

# The enum-typed columns whose table carries a CHECK of the allowed values (ck_<table>_<column>).
CHECKED_ENUM_COLUMNS = {
    ("cards", "status"): CardStatus,
    ("plans", "interval"): Interval,
    ("subscriptions", "status"): SubscriptionStatus,
    ("invoices", "state"): InvoiceState,
    ("charge_attempts", "state"): AttemptState,
    ("refunds", "state"): RefundState,
}


def _enum_columns() -> dict[tuple[str, str], type[enum.Enum]]:
    """Every column of the models whose type is an Enum, with its Python enum."""
    return {
        (table.name, column.name): column.type.enum_class
        for table in Base.metadata.tables.values()
        for column in table.columns
        if isinstance(column.type, sa.Enum) and column.type.enum_class is not None
    }


def test_the_status_columns_are_enum_typed_and_keep_their_varchar_length() -> None:
    columns = _enum_columns()
    unchecked = {
        ("charge_attempts", "decline_class"): DeclineClass,
        ("plans", "tax_treatment"): TaxTreatment,
        ("invoices", "tax_treatment"): TaxTreatment,
    }
    assert columns == {**CHECKED_ENUM_COLUMNS, **unchecked}
    for table, column in columns:
        assert Base.metadata.tables[table].c[column].type.length == (8 if column == "interval" else 16)


def test_migrated_checks_allow_exactly_the_enum_values(db_url: str) -> None:
    """The CHECKs that migrations 0001/0002 created list the enums' values: adding a value needs a migration."""
    migrate.upgrade(db_url)
    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            for (table, column), enum_class in CHECKED_ENUM_COLUMNS.items():
                checks = {str(c["name"]): str(c["sqltext"]) for c in insp.get_check_constraints(table)}
                sqltext = checks[f"ck_{table}_{column}"]
                assert set(re.findall(r"'([^']*)'", sqltext)) == {m.value for m in enum_class}, (table, sqltext)
            ca_checks = {str(c["name"]) for c in insp.get_check_constraints("charge_attempts")}
            assert "ck_charge_attempts_decline_class" not in ca_checks  # the schema has none for it
    finally:
        engine.dispose()


def test_rows_written_as_plain_sql_load_as_enum_members(db_url: str) -> None:
    """Rows as the bulk SQL path writes them (plain strings) load as members of the domain enums."""
    migrate.upgrade(db_url)
    _seed_core(db_url)
    _execute(db_url, "UPDATE charge_attempts SET decline_class = 'soft' WHERE id = 1")
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            assert session.get_one(Card, 1).status is CardStatus.USABLE
            assert session.get_one(Plan, 1).interval is Interval.MONTH
            assert session.get_one(Subscription, 1).status is SubscriptionStatus.ACTIVE
            assert session.get_one(Invoice, 1).state is InvoiceState.OPEN
            attempt = session.get_one(ChargeAttempt, 1)
            assert attempt.state is AttemptState.DECLINED
            assert attempt.decline_class is DeclineClass.SOFT
            # Compared by value, so code that still compares with plain strings keeps working.
            assert session.scalars(sa.select(Invoice.id).where(Invoice.state == "open")).all() == [1]
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("model", "attribute", "bad"),
    [(ChargeAttempt, "decline_class", "declined"), (Invoice, "state", "paied"), (Card, "status", "USABLE")],
)
def test_a_value_outside_the_enum_is_refused_before_sql_and_changes_nothing(
    db_url: str, model: type[Base], attribute: str, bad: str
) -> None:
    migrate.upgrade(db_url)
    _seed_core(db_url)
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            row = session.get_one(model, 1)
            before = getattr(row, attribute)
            setattr(row, attribute, bad)
            with pytest.raises(StatementError) as caught:
                session.flush()
            # Refused by the column type, not by a database constraint (decline_class has none).
            assert not isinstance(caught.value, IntegrityError)
            assert isinstance(caught.value.orig, LookupError)
            assert repr(bad) in str(caught.value.orig)
        with Session(engine) as session:
            assert getattr(session.get_one(model, 1), attribute) == before
    finally:
        engine.dispose()


def test_every_partial_index_has_one_predicate_for_both_dialects() -> None:
    partial = [
        index
        for table in Base.metadata.tables.values()
        for index in table.indexes
        if index.dialect_options["postgresql"]["where"] is not None
        or index.dialect_options["sqlite"]["where"] is not None
    ]
    assert len(partial) == 14
    for index in partial:
        assert str(index.dialect_options["postgresql"]["where"]) == str(index.dialect_options["sqlite"]["where"])


def test_generated_sql_spellings() -> None:
    assert sql_one_of("state", AttemptState.APPROVED) == "state = 'approved'"
    assert sql_in("state", [RefundState.REQUESTED, RefundState.SENDING]) == "state in ('requested', 'sending')"
    assert str(enum_check("status", CardStatus).sqltext) == "status in ('usable', 'unusable')"
    assert str(partial_index("ix_x", "id", where="published_at IS NULL").dialect_options["sqlite"]["where"]) == (
        "published_at IS NULL"
    )


class _Quoted(enum.StrEnum):
    PLAIN = "plain"
    QUOTED = "it's"


class _Long(enum.StrEnum):
    LONG = "seventeen-letters"


def test_the_helpers_refuse_what_they_cannot_spell() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        sql_one_of("state")
    with pytest.raises(ValueError, match="plain SQL literal"):
        enum_check("status", _Quoted)
    with pytest.raises(ValueError, match="17 characters, longer than the column's 16"):
        enum_column(_Long)


# --- the invariant the partial unique index enforces ----------------------------------------------


def test_at_most_one_approved_attempt_per_invoice(db_url: str) -> None:
    migrate.upgrade(db_url)
    _seed_core(db_url)  # attempt 1 is declined
    _execute(db_url, _attempt(2, 2, "approved"))
    with pytest.raises(IntegrityError) as caught:
        _execute(db_url, _attempt(3, 3, "approved"))
    assert "uq_charge_attempts_one_approved" in str(caught.value) or "UNIQUE" in str(caught.value)
    _execute(db_url, _attempt(3, 3, "declined"))  # other states are not limited by this index
    assert _scalar(db_url, "SELECT count(*) FROM charge_attempts WHERE state = 'approved'") == 1


def test_at_most_one_open_attempt_per_invoice(db_url: str) -> None:
    migrate.upgrade(db_url)
    _seed_core(db_url)
    _execute(db_url, _attempt(2, 2, "unknown"))
    with pytest.raises(IntegrityError):
        _execute(db_url, _attempt(3, 3, "pending"))


# --- the CLI -----------------------------------------------------------------------------------------


def _invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_cli_upgrade_current_heads(sqlite_url: str) -> None:
    result = _invoke("db", "current", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    assert "no revision" in result.output

    result = _invoke("db", "upgrade", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    assert f"database at head {HEAD} ({sqlite_url})" in result.output

    result = _invoke("db", "upgrade", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output

    result = _invoke("db", "current", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"database at head {HEAD} ({sqlite_url})"

    result = _invoke("db", "heads")
    assert result.exit_code == 0 and result.output.strip() == f"{HEAD} (head)"

    result = _invoke("db", "check", "--database-url", sqlite_url)
    assert result.exit_code == 0, result.output


def test_cli_defaults_to_database_url_from_the_environment(sqlite_url: str) -> None:
    result = _invoke("db", "upgrade", "--revision", "0001", env={"DATABASE_URL": sqlite_url})
    assert result.exit_code == 0, result.output
    assert "0001" in result.output and sqlite_url in result.output
    result = _invoke("db", "current", env={"DATABASE_URL": sqlite_url})
    assert "revision 0001" in result.output and f"head is {HEAD}" in result.output


def test_cli_check_reports_drift(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    _execute(sqlite_url, "DROP INDEX ix_invoices_state")
    result = _invoke("db", "check", "--database-url", sqlite_url)
    assert result.exit_code == 1
    assert "ix_invoices_state" in result.output


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "invalid database URL"),
        ("nosuchdialect://x/y", "invalid database URL"),
        ("sqlite:////nonexistent-dir/for/sure/billing.db", "cannot use the database"),
    ],
)
def test_cli_bad_url_is_a_clear_error(url: str, expected: str) -> None:
    result = _invoke("db", "upgrade", "--database-url", url)
    assert result.exit_code == 1
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_unknown_revision_is_a_clear_error(sqlite_url: str) -> None:
    result = _invoke("db", "upgrade", "--revision", "nope", "--database-url", sqlite_url)
    assert result.exit_code == 1
    assert "nope" in result.output


def test_cli_refuses_tables_created_outside_migrations(sqlite_url: str) -> None:
    _create_all(sqlite_url)
    result = _invoke("db", "upgrade", "--database-url", sqlite_url)
    assert result.exit_code == 1
    assert "no migration revision" in result.output


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", ["upgrade", "current"])
def test_cli_unreachable_postgres_does_not_print_the_password(command: str) -> None:
    password = "s3cr3t-Pa55word"
    url = f"postgresql://billing:{password}@127.0.0.1:{_closed_port()}/billing"
    result = _invoke("db", command, "--database-url", url)
    assert result.exit_code == 1
    assert "cannot use the database at postgresql://billing:***@127.0.0.1" in result.output
    assert password not in result.output
