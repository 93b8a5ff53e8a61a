"""`billing db`: migrate the database with the Alembic revisions shipped in the package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

T = TypeVar("T")

_URL_HELP = "SQLAlchemy database URL [default: DATABASE_URL, else sqlite:///billing.db]"


def _database_url(given: str | None) -> str:
    if given:
        return given
    from billing.config import ConfigError, Settings

    try:
        return Settings.from_env().database_url
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def safe_url(url: str) -> str:
    """The URL for messages: password masked; never raises."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Unparseable: echo it only when it cannot be hiding credentials.
        return repr(url) if "@" not in url and ":" not in url else "<unparseable database URL>"


def _scrub(message: str, url: str) -> str:
    """First line of a driver message, with the URL's password removed should the driver echo it."""
    from sqlalchemy.engine import make_url

    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(message).__name__
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def _run(url: str, action: Callable[[], T]) -> T:
    """Run `action`, turning configuration and database failures into one clear line, exit code 1."""
    from alembic.util import CommandError
    from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

    where = safe_url(url)
    try:
        return action()
    except ArgumentError as exc:  # includes NoSuchModuleError (unknown dialect)
        raise click.ClickException(f"invalid database URL {where}: {_scrub(str(exc), url)}") from None
    except ImportError as exc:
        raise click.ClickException(f"no driver for {where}: {_scrub(str(exc), url)}") from None
    except OperationalError as exc:
        message = _scrub(str(exc.orig), url)
        raise click.ClickException(f"cannot use the database at {where}: {message}") from None
    except DBAPIError as exc:
        raise click.ClickException(f"migration failed on {where}: {_scrub(str(exc.orig), url)}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database error on {where}: {_scrub(str(exc), url)}") from None
    except CommandError as exc:
        raise click.ClickException(f"{_scrub(str(exc), url)} ({where})") from None


def _describe(revision: str | None, head: str) -> str:
    if revision is None:
        return f"database is empty (no revision; head is {head})"
    if revision == head:
        return f"database at head {head}"
    return f"database at revision {revision} (head is {head}; run `billing db upgrade`)"


@click.group()
def db() -> None:
    """Database migrations (Alembic, shipped with the package)."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--database-url", "database_url", default=None, help=_URL_HELP)
def upgrade(revision: str, database_url: str | None) -> None:
    """Create or migrate the database schema up to REVISION. Safe to run again."""
    from billing.db import migrate

    url = _database_url(database_url)
    where = safe_url(url)
    before = _run(url, lambda: migrate.current_revision(url))
    if before is None:
        unversioned = _run(url, lambda: migrate.existing_tables(url))
        if unversioned:
            raise click.ClickException(
                f"the database at {where} has tables ({', '.join(unversioned[:5])}"
                f"{', ...' if len(unversioned) > 5 else ''}) but no migration revision: it was not created "
                "by `billing db upgrade`; use an empty database"
            )
    _run(url, lambda: migrate.upgrade(url, revision))
    after = _run(url, lambda: migrate.current_revision(url))
    head = migrate.head_revision()
    if before == after:
        click.echo(f"{_describe(after, head)}, nothing to do ({where})")
    else:
        click.echo(f"upgraded {before or 'empty database'} -> {after}; {_describe(after, head)} ({where})")


@db.command()
@click.option("--database-url", "database_url", default=None, help=_URL_HELP)
def current(database_url: str | None) -> None:
    """Show the revision the database is at."""
    from billing.db import migrate

    url = _database_url(database_url)
    revision = _run(url, lambda: migrate.current_revision(url))
    click.echo(f"{_describe(revision, migrate.head_revision())} ({safe_url(url)})")


@db.command()
def heads() -> None:
    """Show the newest revision(s) shipped with this version of the package."""
    from billing.db import migrate

    for head in migrate.heads():
        click.echo(f"{head} (head)")


@db.command()
@click.option("--database-url", "database_url", default=None, help=_URL_HELP)
def check(database_url: str | None) -> None:
    """Exit non-zero if the database schema differs from the models (what autogenerate would change)."""
    from billing.db import migrate

    url = _database_url(database_url)
    diffs = _run(url, lambda: migrate.schema_diff(url))
    if diffs:
        for diff in diffs:
            click.echo(f"  {diff}", err=True)
        raise click.ClickException(f"{len(diffs)} difference(s) between the models and {safe_url(url)}")
    click.echo(f"schema matches the models ({safe_url(url)})")
