"""Alembic environment for the packaged migrations.

The database URL comes from the Alembic Config built by `billing.db.migrate.alembic_config` (or a
`connection` passed in `config.attributes`), never from the environment at import time.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from billing.db.engine import normalize_url
from billing.db.migrate import context_options, lock_for_migration, migration_engine

config = context.config


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: build the config with billing.db.migrate.alembic_config(url)")
    return normalize_url(str(url))


def run_migrations_offline() -> None:
    """`--sql` mode: emit the DDL instead of running it."""
    url = _url()
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **context_options("postgresql" if dialect.startswith("postgres") else dialect),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **context_options(connection.dialect.name))
    with context.begin_transaction():
        lock_for_migration(connection)
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    engine = migration_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
