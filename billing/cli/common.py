"""Shared plumbing of the operator commands: settings, the service context, error mapping and output.

Every command reads its configuration from the environment (`Settings.from_env`), builds one `Context`,
and turns the errors a user can cause (bad input, bad configuration, a gateway refusal, a database that was
never migrated) into one clear line on stderr and exit status 1. Messages never contain a key or a token:
the services and the gateway client already keep ids and secrets out of theirs, and nothing here adds any.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

import click

from billing.config import ConfigError, Settings, describe_config_error

P = ParamSpec("P")
R = TypeVar("R")

DATABASE_URL_HELP = "SQLAlchemy database URL [default: DATABASE_URL, else sqlite:///billing.db]"
# Our ids are PostgreSQL bigints: a larger number names nothing, and sent to the database it would fail as
# "bigint out of range" (reported as an unusable database). Refuse it as the usage error it is.
ID = click.IntRange(1, 2**63 - 1)


# --- settings and context --------------------------------------------------------------------------------


def load_settings(database_url: str | None = None) -> Settings:
    """Settings from the environment (and `.env`), with `--database-url` taking precedence."""
    settings = Settings.from_env()
    if database_url:
        settings = dataclasses.replace(settings, database_url=database_url)
    return settings


class LazyGateway:
    """The Tpaga client, built on first use: commands that never call Tpaga need no keys.

    A missing TPAGA_PRIVATE_KEY surfaces as a ConfigError only when a call is actually made. Commands that
    charge or refund (`billing tick`) pass a client built up front instead: the charge path records any
    exception from the gateway as an unknown outcome, and a missing key must not look like one.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from billing.bootstrap import build_gateway

                self._client = build_gateway(self._settings)
            return self._client

    def create_customer(self, **fields: Any) -> Any:
        return self.client().create_customer(**fields)

    def associate_card(self, customer_id: str, temp_token: str) -> Any:
        return self.client().associate_card(customer_id, temp_token)

    def charge(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Any:
        return self.client().charge(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            description=description,
            tax_amount=tax_amount,
            iac_amount=iac_amount,
            deadline=deadline,
        )

    async def charge_async(
        self,
        *,
        card_id: str,
        amount: Decimal,
        currency: str,
        order_id: str,
        description: str | None = None,
        tax_amount: Decimal = Decimal(0),
        iac_amount: Decimal = Decimal(0),
        deadline: float | None = None,
    ) -> Any:
        return await self.client().charge_async(
            card_id=card_id,
            amount=amount,
            currency=currency,
            order_id=order_id,
            description=description,
            tax_amount=tax_amount,
            iac_amount=iac_amount,
            deadline=deadline,
        )

    def get_charge(self, charge_id: str) -> Any:
        return self.client().get_charge(charge_id)

    def refund(self, charge_id: str) -> Any:
        return self.client().refund(charge_id)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


@contextmanager
def open_context(settings: Settings, *, publisher: Any = None, gateway: Any = None) -> Iterator[Any]:
    """A service `Context` for one command; its engine and HTTP sessions are closed afterwards."""
    from billing.bootstrap import build_context
    from billing.db.engine import make_engine

    engine = make_engine(settings.database_url)
    lazy = gateway if gateway is not None else LazyGateway(settings)
    try:
        yield build_context(settings, engine=engine, gateway=lazy, publisher=publisher)
    finally:
        close = getattr(lazy, "close", None)
        if gateway is None and close is not None:
            close()
        engine.dispose()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Any]:
    """A read-only session on the configured database."""
    from billing.db.engine import make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


# --- errors ----------------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _database_message(exc: Exception, url: str | None) -> str:
    from billing.cli.db import _scrub, safe_url

    orig = getattr(exc, "orig", None) or exc
    where = safe_url(url) if url else "the database"
    text = _scrub(str(orig), url) if url else _first_line(str(orig))
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"the database at {where} is not migrated ({text}): run `billing db upgrade` first"
    return f"cannot use the database at {where}: {text}"


def _gateway_message(exc: Exception) -> str:
    from billing.gateway import errors as gw

    if isinstance(exc, gw.UnauthorizedError):
        return "Tpaga rejected the API key (HTTP 401): check TPAGA_PRIVATE_KEY / TPAGA_PUBLIC_KEY"
    if isinstance(exc, gw.NotSentError):
        return f"could not reach Tpaga (nothing was sent): {exc}"
    return f"Tpaga: {exc}"


def explain(exc: BaseException, database_url: str | None = None) -> str | None:
    """One line for an error a user can cause, or None for a bug (which keeps its traceback)."""
    from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

    from billing.domain.money import MoneyError
    from billing.gateway.errors import TpagaError
    from billing.services.errors import ServiceError

    if isinstance(exc, ServiceError | MoneyError):
        return str(exc)
    if isinstance(exc, ConfigError):
        return describe_config_error(exc)
    if isinstance(exc, TpagaError):
        return _gateway_message(exc)
    if isinstance(exc, ArgumentError):
        return f"invalid database URL: {_first_line(str(exc))}"
    if isinstance(exc, DBAPIError | SQLAlchemyError):
        return _database_message(exc, database_url)
    if isinstance(exc, ValueError):
        # The gateway client checks its inputs with ValueErrors whose messages never echo the value.
        return str(exc)
    return None


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Map user-caused errors to click.ClickException (one line on stderr, exit status 1)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            url = kwargs.get("database_url")
            if not isinstance(url, str) or not url:
                try:
                    url = Settings.from_env().database_url
                except ConfigError:
                    url = None
            message = explain(exc, url)
            if message is None:
                raise
            raise click.ClickException(message) from None

    return wrapper


def database_option(func: Callable[P, R]) -> Callable[P, R]:
    """The `--database-url` option, passed to the command as `database_url`."""
    return click.option("--database-url", "database_url", default=None, metavar="URL", help=DATABASE_URL_HELP)(func)


def json_option(func: Callable[P, R]) -> Callable[P, R]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(func)


# --- output ----------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=_json_default))


def format_money(amount_minor: int, currency: str) -> str:
    from billing.domain.money import Money

    return f"{Money(int(amount_minor), currency).major} {currency}"


def format_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "(none)") -> None:
    """A plain left-aligned table; `empty` when there are no rows."""
    if not rows:
        click.echo(empty)
        return
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def parse_when(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 date or time for an option; a naive value is taken as UTC."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (e.g. 2026-01-31 or 2026-01-31T12:00:00-05:00)",
            param_hint=name,
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


# --- who acts ----------------------------------------------------------------------------------------------


def by_option(func: Callable[P, R]) -> Callable[P, R]:
    """`--by`: who acts, recorded with the change (an `operator.action` event); default the OS user."""
    return click.option(
        "--by", "by", default=None, metavar="NAME", help="Who acts (recorded with the change) [default: the OS user]."
    )(func)


def actor_options(func: Callable[P, R]) -> Callable[P, R]:
    """`--by` and `--reason`, both recorded with the change."""
    func = click.option("--reason", default=None, help="Why (recorded with the change; at most 255 characters).")(func)
    return by_option(func)


def make_actor(by: str | None, reason: str | None) -> Any:
    """The checked operator of a command; a bad --by or --reason is a usage error that changed nothing."""
    from billing.services.errors import InvalidRequest
    from billing.services.operators import Actor

    try:
        return Actor.of(by, reason)
    except InvalidRequest as exc:
        raise click.UsageError(str(exc)) from None
