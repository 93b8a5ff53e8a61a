"""Alembic, configured in code: the migrations ship inside the package, no alembic.ini needed.

    from billing.db.migrate import upgrade, current_revision, head_revision
    upgrade("sqlite:///billing.db")            # idempotent; one transaction on both dialects
    current_revision("sqlite:///billing.db")   # "0003", or None for an empty database
    head_revision()                            # "0003"

To write a new migration, edit billing/db/models.py, then autogenerate against a database at head and
hand-check the result (see tests/test_migrations.py, which fails while models and migrations disagree).
Autogenerate does not see CHECK constraints: adding a value to a status enum of billing.domain changes the
CHECK that billing.db.models generates from it, and that change needs a hand-written migration::

    python -c "from alembic import command; from billing.db.migrate import alembic_config; \
command.revision(alembic_config('sqlite:///dev.db'), message='...', rev_id='0003', autogenerate=True)"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.pool import NullPool

from billing.db.engine import normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any constant works: a transaction-scoped PostgreSQL advisory lock that serializes concurrent
# `billing db upgrade` runs (two deploys at once), so the second one sees the first one's result.
_PG_MIGRATION_LOCK_KEY = 0x7B1A_0001
# How long a migration waits to reach PostgreSQL or a locked SQLite file before failing.
CONNECT_TIMEOUT_SECONDS = 10


def alembic_config(url: str) -> Config:
    """An Alembic Config pointing at the packaged migrations and the given database URL."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%', and PostgreSQL URLs carry percent-escapes (options=-csearch_path%3D...).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["database_url"] = url
    return config


def migration_engine(url: str) -> Engine:
    """A NullPool engine for migrations, with the whole upgrade in one transaction on both dialects.

    SQLite gets the same BEGIN IMMEDIATE handling as `billing.db.engine.make_engine` (so DDL is
    transactional and concurrent migrators queue), but with foreign keys left OFF, as batch-mode table
    rebuilds require.
    """
    url = normalize_url(url)
    parsed = make_url(url)  # raises ArgumentError for a malformed URL
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=OFF")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def context_options(dialect_name: str) -> dict[str, Any]:
    """Options shared by env.py and `schema_diff`, so the drift check sees what autogenerate sees."""
    from billing.db.models import Base

    return {
        "target_metadata": Base.metadata,
        "render_as_batch": dialect_name == "sqlite",
        "transactional_ddl": True,
        "compare_type": True,
    }


def lock_for_migration(connection: Any) -> None:
    """Serialize migrators: PostgreSQL takes an advisory lock; SQLite already holds BEGIN IMMEDIATE."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_KEY})")


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` up to `revision` (default: head). Safe to run again.

    Concurrent runs from several processes are serialized (advisory lock / BEGIN IMMEDIATE); do not run
    two at once in threads of one process: Alembic's `context` is process-global.
    """
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Step the database back to `revision` ("base" drops everything). For development and tests."""
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    parsed = make_url(normalize_url(url))
    database = parsed.database or ""
    is_plain_file = database not in ("", ":memory:") and not database.startswith("file:")
    if parsed.get_backend_name() == "sqlite" and is_plain_file and not Path(database).exists():
        return None  # don't create an empty file just to look at it
    engine = migration_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def existing_tables(url: str) -> list[str]:
    """The tables of the models that already exist in the database (visible in its search_path)."""
    from billing.db.models import Base

    engine = migration_engine(url)
    try:
        with engine.connect() as connection:
            present = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    return [name for name in Base.metadata.tables if name in present]


def _script_directory() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


def head_revision() -> str:
    """The newest revision shipped with this package."""
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def heads() -> tuple[str, ...]:
    """All head revisions (more than one means two migrations need merging)."""
    return tuple(_script_directory().get_heads())


def schema_diff(url: str) -> list[Any]:
    """What autogenerate would change to make the database match the models (empty when in sync)."""
    engine = migration_engine(url)
    try:
        with engine.connect() as connection:
            opts = context_options(connection.dialect.name)
            opts.pop("transactional_ddl")
            context = MigrationContext.configure(connection, opts=opts)
            return list(compare_metadata(context, opts["target_metadata"]))
    finally:
        engine.dispose()
