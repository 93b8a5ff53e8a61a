"""The counts the exporter reads are maintained by database triggers (migration 0009): after any mix of writes
(single rows, multi-row statements like billing.db.bulk's, deletes, rollbacks, concurrent transactions, folds)
they equal a fresh GROUP BY of the tables, on PostgreSQL and SQLite; concurrent writers do not wait for each
other on them; the upgrade backfills them from existing rows and the downgrade removes every trace."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from billing.db import migrate
from billing.db.engine import make_engine
from billing.metrics import ScrapeError, families
from billing.services import metrics

T0 = "2026-01-31 12:00:00"
SUBSCRIPTIONS = 40
counts_migration: Any = importlib.import_module("billing.db.migrations.versions.0009_metric_counts")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    # make_engine: SQLite's BEGIN IMMEDIATE and foreign keys, as the workers write.
    engine = make_engine(db_url, poolclass=sa.pool.NullPool) if db_url.startswith("sqlite") else make_engine(db_url)
    yield engine
    engine.dispose()


def run(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def seed(engine: sa.Engine, first: int = 1, n: int = SUBSCRIPTIONS) -> None:
    """n subscriptions on two plans, each with an invoice and an attempt in varied states, some refunds, two
    endpoints with deliveries: multi-row INSERTs, as the bulk builder writes."""
    ids = range(first, first + n)
    statuses = ("active", "past_due", "trialing", "canceled", "unpaid")
    invoice_states = ("open", "paid", "paid", "review", "void", "uncollectible")
    attempt_states = ("approved", "declined", "pending", "unknown", "not_sent", "duplicate", "sending")
    codes = ("51", "14", None, "05", "T8")

    def values(rows: list[str]) -> str:
        return ", ".join(rows)

    def q(value: str | None) -> str:
        return "NULL" if value is None else f"'{value}'"

    statements = []
    if first == 1:
        statements += [
            "INSERT INTO customers (id, tpaga_customer_id, merchant_customer_id, email, created_at) "
            f"VALUES (1, 'tc-1', 'm-1', 'a@example.com', '{T0}')",
            "INSERT INTO cards (id, customer_id, tpaga_card_id, brand, last_four, status, created_at) "
            f"VALUES (1, 1, 'card-1', 'VISA', '4242', 'usable', '{T0}')",
            "INSERT INTO plans (id, code, name, amount_minor, currency, interval, interval_count, trial_days, "
            f"created_at) VALUES (1, 'm', 'M', 3000000, 'COP', 'month', 1, 0, '{T0}'), "
            f"(2, 'y', 'Y', 120000000, 'COP', 'year', 1, 0, '{T0}')",
            "INSERT INTO endpoints (id, url, kind, status, from_offset, created_at) VALUES "
            f"(1, 'https://a.example/h', 'webhook', 'active', 0, '{T0}'), "
            f"(2, 'https://b.example/h', 'webhook', 'failing', 0, '{T0}')",
        ]
    statements += [
        "INSERT INTO subscriptions (id, customer_id, plan_id, card_id, status, anchor_at, next_period_index, "
        "next_billing_at, paused_at, created_at, updated_at) VALUES "
        + values(
            [
                f"({i}, 1, {1 + i % 2}, 1, '{statuses[i % 5]}', '{T0}', 1, '{T0}', "
                f"{q(T0 if i % 7 == 0 else None)}, '{T0}', '{T0}')"
                for i in ids
            ]
        ),
        "INSERT INTO invoices (id, subscription_id, period_index, period_start, period_end, amount_minor, "
        "currency, state, attempt_count, soft_failures, last_error_code, created_at, updated_at) VALUES "
        + values(
            [
                f"({i}, {i}, 0, '{T0}', '{T0}', 3000000, 'COP', '{invoice_states[i % 6]}', 1, 0, "
                f"{q(codes[i % 5] if i % 3 else None)}, '{T0}', '{T0}')"
                for i in ids
            ]
        ),
        "INSERT INTO charge_attempts (id, invoice_id, attempt_number, order_id, card_id, amount_minor, currency, "
        "state, error_code, decline_class, created_at) VALUES "
        + values(
            [
                f"({i}, {i}, 1, 'inv-{i}-1', 1, 3000000, 'COP', '{attempt_states[i % 7]}', "
                f"{q(codes[i % 5])}, {q('soft' if attempt_states[i % 7] == 'declined' else None)}, '{T0}')"
                for i in ids
            ]
        ),
        "INSERT INTO refunds (id, invoice_id, charge_attempt_id, state, reason, deadline_at, requested_at) VALUES "
        + values(
            [
                f"({i}, {i}, {i}, '{('requested', 'voided', 'unknown')[i % 3]}', 'r', '{T0}', '{T0}')"
                for i in ids
                if i % 4 == 0
            ]
        ),
        "INSERT INTO deliveries (endpoint_id, stream_offset, key, state, attempts, next_attempt_at, created_at) "
        "VALUES "
        + values(
            [f"({1 + i % 2}, {i}, 's{i}', '{'pending' if i % 3 else 'delivered'}', 0, '{T0}', '{T0}')" for i in ids]
        ),
    ]
    run(engine, *statements)


def truth(engine: sa.Engine) -> dict[metrics.Key, int]:
    """The counts by a fresh GROUP BY of every table (independent of the triggers and of the migration)."""
    queries = {
        "invoices": "SELECT state, '', '', count(*) FROM invoices GROUP BY state",
        "recovered": "SELECT '', '', '', count(*) FROM invoices WHERE state = 'paid' AND last_error_code IS NOT NULL",
        "attempts": "SELECT state, coalesce(error_code, ''), coalesce(decline_class, ''), count(*) "
        "FROM charge_attempts WHERE state IN ('approved', 'declined', 'duplicate', 'not_sent') "
        "GROUP BY state, error_code, decline_class",
        "refunds": "SELECT state, '', '', count(*) FROM refunds GROUP BY state",
        "paying": "SELECT CAST(plan_id AS TEXT), '', '', count(*) FROM subscriptions "
        "WHERE status IN ('active', 'past_due') AND paused_at IS NULL GROUP BY plan_id",
        "backlog": "SELECT CAST(endpoint_id AS TEXT), '', '', count(*) FROM deliveries WHERE state = 'pending' "
        "GROUP BY endpoint_id",
    }
    found: dict[metrics.Key, int] = {}
    with engine.connect() as conn:
        for metric, query in queries.items():
            for k1, k2, k3, n in conn.execute(sa.text(query)):
                if n:
                    found[(metric, str(k1), str(k2), str(k3))] = int(n)
    return found


def maintained(engine: sa.Engine) -> dict[metrics.Key, int]:
    with engine.connect() as conn:
        return {key: n for key, n in metrics.maintained(conn, datetime.now(UTC)).items() if n}


def deltas(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM metric_deltas")).scalar_one())


def fold(engine: sa.Engine) -> int:
    with engine.begin() as conn:
        return metrics.fold(conn)


# Every kind of change a counted column sees, as the services and billing.db.bulk write them: multi-row UPDATEs
# of the counted columns, updates of other columns (no delta), deletes, and a dunning recovery.
CHANGES = (
    "UPDATE invoices SET state = 'paid', updated_at = updated_at WHERE state = 'open'",
    "UPDATE invoices SET attempt_count = attempt_count + 1",
    "UPDATE invoices SET last_error_code = '51' WHERE state = 'paid' AND last_error_code IS NULL AND id % 2 = 0",
    "UPDATE charge_attempts SET state = 'approved', error_code = '00', decline_class = NULL "
    "WHERE state IN ('pending', 'sending', 'not_sent')",
    "UPDATE charge_attempts SET decline_class = 'hard', error_code = '14' WHERE state = 'declined' AND id % 2 = 0",
    "UPDATE refunds SET state = 'voided' WHERE state = 'requested'",
    "DELETE FROM refunds WHERE state = 'unknown'",
    "UPDATE subscriptions SET paused_at = NULL WHERE paused_at IS NOT NULL",
    "UPDATE subscriptions SET status = 'past_due' WHERE status = 'active' AND id % 3 = 0",
    "UPDATE subscriptions SET plan_id = 2 WHERE plan_id = 1 AND id % 5 = 1",
    "UPDATE deliveries SET state = 'delivered' WHERE state = 'pending' AND stream_offset % 2 = 0",
    "DELETE FROM deliveries WHERE endpoint_id = 2 AND state = 'pending'",
)


def test_counts_follow_every_kind_of_write_and_a_fold_keeps_them(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    seed(engine)
    assert maintained(engine) == truth(engine) != {}
    for change in CHANGES:
        run(engine, change)
        assert maintained(engine) == truth(engine), change
    # A fold moves every delta into the totals and changes no count; a second one has nothing to move
    before = maintained(engine)
    pending = deltas(engine)
    assert pending > 0
    assert fold(engine) == pending
    assert fold(engine) == 0
    assert deltas(engine) == 0
    assert maintained(engine) == before == truth(engine)
    # And writes after a fold add to the folded totals
    seed(engine, first=SUBSCRIPTIONS + 1, n=10)
    run(engine, CHANGES[0], CHANGES[3])
    assert maintained(engine) == truth(engine)


def test_a_rolled_back_change_counts_nothing(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    seed(engine)
    before = maintained(engine)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        for change in CHANGES:
            conn.execute(sa.text(change))
        raise RuntimeError("the charge transaction fails after its writes")
    assert maintained(engine) == before == truth(engine)


@pytest.mark.postgres
def test_concurrent_transitions_do_not_wait_on_the_counts_and_a_fold_takes_only_committed_deltas(
    pg_url: str,
) -> None:
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    seed(engine)
    try:
        # Given two charge transactions in flight at once, each changing counted states of its own rows (both
        # append deltas with the same label sets: open -> paid, an approved attempt)
        with engine.connect() as first, engine.connect() as second, engine.connect() as folder:
            first.begin()
            first.execute(sa.text("UPDATE invoices SET state = 'paid' WHERE id = 6"))
            first.execute(sa.text("UPDATE charge_attempts SET state = 'approved' WHERE id = 3"))
            second.begin()
            # Then the second neither waits for the first (a lock wait would fail it after 2 s) ...
            second.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            second.execute(sa.text("UPDATE invoices SET state = 'paid' WHERE id = 12"))
            second.execute(sa.text("UPDATE charge_attempts SET state = 'approved' WHERE id = 10"))
            # ... nor does a fold meanwhile, which moves none of their uncommitted deltas
            folder.begin()
            folder.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            metrics.fold(folder)
            folder.commit()
            # When the first commits and the second rolls back
            first.commit()
            second.rollback()
        # Then the counts hold the first's changes only
        assert maintained(engine) == truth(engine)
        with engine.connect() as conn:
            states = dict(conn.execute(sa.text("SELECT id, state FROM invoices WHERE id IN (6, 12)")).all())
        assert states == {6: "paid", 12: "open"}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_many_concurrent_writers_and_folds_keep_the_counts_exact(pg_url: str) -> None:
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url, pool_size=6)
    seed(engine, n=120)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(offset, 121, 4):
                with engine.begin() as conn:  # one transaction per invoice, as the charge path writes
                    conn.execute(sa.text("UPDATE invoices SET state = 'paid' WHERE id = :id"), {"id": i})
                    conn.execute(
                        sa.text("UPDATE charge_attempts SET state = 'declined', error_code = '51' WHERE id = :id"),
                        {"id": i},
                    )
                if i % 3 == 0:
                    with pytest.raises(RuntimeError), engine.begin() as conn:
                        conn.execute(sa.text("UPDATE refunds SET state = 'expired' WHERE invoice_id = :id"), {"id": i})
                        raise RuntimeError("rolled back")
                if i % 8 == 0:
                    fold(engine)
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(offset,)) for offset in range(1, 5)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert maintained(engine) == truth(engine)
        fold(engine)
        assert deltas(engine) == 0 and maintained(engine) == truth(engine)
    finally:
        engine.dispose()


def test_the_upgrade_backfills_existing_rows_and_the_downgrade_removes_the_triggers(
    db_url: str, engine: sa.Engine
) -> None:
    # Given a database with billing history at 0008 (the revision before 0009)
    migrate.upgrade(db_url, "0008")
    seed(engine)
    run(engine, *CHANGES)
    # When it is upgraded, the totals start from the rows as they are, with no delta
    migrate.upgrade(db_url)
    assert deltas(engine) == 0
    assert maintained(engine) == truth(engine)
    # And back at 0008 the tables and triggers are gone: writes work as before
    migrate.downgrade(db_url, "0008")
    assert not {"metric_deltas", "metric_totals"} & set(sa.inspect(engine).get_table_names())
    run(engine, "UPDATE invoices SET state = 'void'", "DELETE FROM deliveries")
    migrate.upgrade(db_url)
    assert maintained(engine) == truth(engine)


def test_the_migration_counts_what_the_exporter_says_it_counts() -> None:
    frozen = counts_migration.FINISHED.strip("()").replace("'", "").split(", ")
    assert frozen == [state.value for state in metrics.FINISHED_ATTEMPTS]
    paying = counts_migration.COUNTED["subscriptions"][1][0][4]
    assert all(f"'{status.value}'" in paying for status in metrics.REVENUE_STATUSES)


def test_the_exporter_reads_backlog_and_failing_endpoints(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    seed(engine)
    run(
        engine,
        f"INSERT INTO endpoints (id, url, kind, status, from_offset, created_at, removed_at) VALUES "
        f"(3, 'https://c.example/h', 'webhook', 'active', 0, '{T0}', '{T0}')",
    )
    with engine.connect() as conn:
        history = metrics.read_history(conn, datetime.now(UTC))
    # 40 deliveries: even offsets to endpoint 1, odd to 2, every third one delivered (1: 20 - 6, 2: 20 - 7);
    # the removed endpoint is left out
    assert history.webhook_backlog == {"1": 14, "2": 13}
    assert history.webhook_failing == {"1": False, "2": True}
    samples = {
        (family.name, sample.labels.get("endpoint")): sample.value
        for family in families(metrics.Live(datetime.now(UTC), 0, 0.0, 0.0, None, None, {}), history)
        for sample in family.samples
        if family.name.startswith("billing_webhook")
    }
    assert samples == {
        ("billing_webhook_backlog", "1"): 14,
        ("billing_webhook_backlog", "2"): 13,
        ("billing_webhook_endpoint_failing", "1"): 0,
        ("billing_webhook_endpoint_failing", "2"): 1,
    }


def test_an_unmigrated_database_fails_the_fold_and_the_read_with_a_clear_error(sqlite_url: str) -> None:
    from billing.clock import SystemClock
    from billing.metrics import fold as fold_engine
    from billing.metrics import read_all, read_engine

    migrate.upgrade(sqlite_url, "0008")
    engine = read_engine(sqlite_url)
    try:
        with pytest.raises(ScrapeError, match=r"^cannot fold the metric deltas: OperationalError$"):
            fold_engine(engine)
        with pytest.raises(ScrapeError, match=r"^cannot read the database: OperationalError$"):
            read_all(engine, SystemClock())
        assert migrate.current_revision(sqlite_url) == "0008"
    finally:
        engine.dispose()


def test_totals_rebuilt_after_a_truncate_match_the_tables(db_url: str, engine: sa.Engine) -> None:
    migrate.upgrade(db_url)
    seed(engine)
    # A TRUNCATE (DELETE without WHERE on SQLite, which fires the triggers: the PostgreSQL case is the one that
    # needs this) leaves the counts wrong on PostgreSQL
    run(engine, "TRUNCATE deliveries" if db_url.startswith("postgresql") else "DELETE FROM deliveries")
    if db_url.startswith("postgresql"):
        assert maintained(engine) != truth(engine)
    with engine.begin() as conn:
        metrics.rebuild_totals(conn)
    assert deltas(engine) == 0
    assert maintained(engine) == truth(engine)
