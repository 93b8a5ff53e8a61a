"""The CLI's shared plumbing, and the harness the other `test_cli_*` modules use.

The harness runs `billing` in-process with click's CliRunner, with the environment a user would set:
DATABASE_URL at a migrated temporary database, TPAGA_* at the emulator (or nowhere), BILLING_CLOCK.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import requests
from click.testing import CliRunner, Result

from billing.cli import main
from billing.cli.common import explain, parse_when
from billing.config import ConfigError

PRIVATE_KEY = "d13fr8n7vhvkuch3lq2ds5qhjnd2pdd2"
PUBLIC_KEY = "pk_test_qvbvuthlvqpijnr0elmtg5jh"
NOWHERE = "http://127.0.0.1:9/api/"  # the discard port: nothing listens

# Variables a developer's shell might carry that would change what a test sees.
_CLEARED = (
    "CELERY_BROKER_URL",
    "BILLING_REFUND_WINDOW",
    "BILLING_TIMEZONE",
    "BILLING_DUNNING_RETRY_DAYS",
    "BILLING_DUNNING_FINAL_ACTION",
    "BILLING_DUNNING_POLICY",
    "BILLING_DUNNING_WINDOW_DAYS",
    "BILLING_DUNNING_PAYDAY_HOUR",
    "TPAGA_CONNECT_TIMEOUT",
    "TPAGA_READ_TIMEOUT",
    "TPAGA_RATE_LIMIT",
    "BILLING_SENDING_LEASE_SECONDS",
)


@dataclass
class Cli:
    """Runs `billing ...` with a fixed environment; `ok()` and `fails()` assert how it ended."""

    env: dict[str, str | None]
    runner: CliRunner = field(default_factory=CliRunner)

    def run(self, *args: str, input: str | None = None, env: Mapping[str, str | None] | None = None) -> Result:
        return self.runner.invoke(main, list(args), input=input, env={**self.env, **(env or {})})

    def ok(self, *args: str, input: str | None = None, env: Mapping[str, str | None] | None = None) -> Result:
        result = self.run(*args, input=input, env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, f"billing {' '.join(args)} -> {result.exit_code}\n{result.output}"
        return result

    def fails(
        self,
        *args: str,
        match: str,
        code: int = 1,
        input: str | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> Result:
        """The command exits with `code` and a clean message (no traceback) containing `match`."""
        result = self.run(*args, input=input, env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"billing {' '.join(args)} crashed instead of failing cleanly") from (result.exception)
        assert result.exit_code == code, f"billing {' '.join(args)} -> {result.exit_code}\n{result.output}"
        assert match in result.output, f"{match!r} not in:\n{result.output}"
        assert "Traceback" not in result.output
        return result

    def json(self, *args: str, env: Mapping[str, str | None] | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", env=env).stdout)


def make_cli(database_url: str, *, api_url: str = NOWHERE, clock: str = "system", **extra: str | None) -> Cli:
    """A harness on a freshly migrated database."""
    from billing.db.migrate import upgrade

    upgrade(database_url)
    env: dict[str, str | None] = dict.fromkeys(_CLEARED)
    env.update(
        DATABASE_URL=database_url,
        TPAGA_API_URL=api_url,
        TPAGA_PRIVATE_KEY=PRIVATE_KEY,
        TPAGA_PUBLIC_KEY=PUBLIC_KEY,
        BILLING_CLOCK=clock,
    )
    env.update(extra)
    return Cli(env)


def ledger(sandbox: Any) -> dict[str, Any]:
    response = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=10)
    response.raise_for_status()
    book: dict[str, Any] = response.json()
    return book


def tokenize(sandbox: Any, number: str = "4111111111111111") -> str:
    from billing.gateway import TpagaClient

    with TpagaClient(sandbox.api_url, PRIVATE_KEY, PUBLIC_KEY) as client:
        return client.tokenize_card(number=number, exp_month=12, exp_year=2031, holder_name="Ana Test", cvc="123")


def db_attempts(database_url: str) -> list[dict[str, Any]]:
    """Every charge attempt with its subscription, straight from the database."""
    from sqlalchemy import select

    from billing.db.engine import make_engine, make_session_factory
    from billing.db.models import ChargeAttempt, Invoice

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(
                select(ChargeAttempt.order_id, ChargeAttempt.state, Invoice.subscription_id, Invoice.id).join(
                    Invoice, Invoice.id == ChargeAttempt.invoice_id
                )
            ).all()
    finally:
        engine.dispose()
    return [{"order_id": o, "state": s, "subscription_id": sub, "invoice_id": inv} for o, s, sub, inv in rows]


def assert_agrees_with_ledger(status: dict[str, Any], book: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
    """`billing status --json`, the database and the emulator's ledger tell the same story."""
    charges = book["charges"]
    approved = [c for c in charges if c["paid"] and not c["voided"]]
    assert len(approved) == status["invoices"].get("paid", 0)
    twice = [order for order, n in Counter(c["orderId"] for c in charges if c["paid"]).items() if n > 1]
    assert twice == [], f"orderIds approved twice: {twice}"
    # One approved charge per subscription (each has a single period here), and the same ones on both sides.
    db_approved = [a for a in attempts if a["state"] == "approved"]
    assert {a["order_id"] for a in db_approved} == {c["orderId"] for c in approved}
    per_sub = Counter(a["subscription_id"] for a in db_approved)
    assert all(n == 1 for n in per_sub.values())
    # Every attempt that reached the emulator is in its ledger, and nothing else is.
    reached = {a["order_id"] for a in attempts if a["state"] in ("approved", "declined", "unknown")}
    assert reached == {c["orderId"] for c in charges}
    assert status["attempts"].get("approved", 0) == len(approved)


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """No gateway: for commands that must not need one."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    return make_cli(sqlite_url)


# --- the plumbing itself -------------------------------------------------------------------------------


def test_every_documented_command_is_registered(cli: Cli) -> None:
    names = set(main.commands)
    assert {
        "plans",
        "customers",
        "cards",
        "subscriptions",
        "seed",
        "tick",
        "status",
        "report",
        "review",
        "refund",
        "resume",
        "clock",
        "webhooks",
        "events",
    } <= names
    for group, subs in {
        "plans": {"create", "list"},
        "customers": {"create", "list"},
        "cards": {"attach", "list"},
        "subscriptions": {"create", "list", "cancel"},
        "review": {"list", "resolve"},
        "clock": {"show", "advance"},
        "webhooks": {"add", "list", "remove", "test", "replay", "rotate-secret", "listen"},
        "events": {"list", "tail"},
    }.items():
        command = main.commands[group]
        assert isinstance(command, click.Group)
        assert subs <= set(command.commands), group


def test_help_of_every_command_renders(cli: Cli) -> None:
    for name, command in main.commands.items():
        cli.ok(name, "--help")
        if isinstance(command, click.Group):
            for sub in command.commands:
                cli.ok(name, sub, "--help")


def test_a_database_that_was_never_migrated_says_to_run_db_upgrade(tmp_path: Path) -> None:
    fresh = Cli({"DATABASE_URL": f"sqlite:///{tmp_path}/empty.db", "BILLING_CLOCK": None})
    fresh.fails("status", match="run `billing db upgrade` first")
    fresh.fails("plans", "list", match="not migrated")


def test_a_malformed_setting_is_a_configuration_error(cli: Cli) -> None:
    cli.fails("status", env={"BILLING_CLOCK": "sundial"}, match="configuration: BILLING_CLOCK must be")
    cli.fails("status", env={"TPAGA_API_URL": "http://tpaga.example/api/"}, match="must use https")


def test_database_url_option_wins_over_the_environment(cli: Cli, tmp_path: Path) -> None:
    from billing.db.migrate import upgrade

    other = f"sqlite:///{tmp_path}/other.db"
    upgrade(other)
    cli.ok("plans", "create", "--code", "only-here", "--amount", "1000", "--database-url", other)
    assert [p["code"] for p in cli.json("plans", "list", "--database-url", other)] == ["only-here"]
    assert cli.json("plans", "list") == []


def test_a_bad_database_url_is_a_clear_error(cli: Cli) -> None:
    cli.fails("status", "--database-url", "nosuchdialect://x/y", match="invalid database URL")


def test_explain_passes_bugs_through_and_names_user_errors() -> None:
    from billing.gateway.errors import NotSentError, UnauthorizedError
    from billing.services.errors import NotFound

    assert explain(NotFound("invoice 9 does not exist")) == "invoice 9 does not exist"
    assert explain(ConfigError("TPAGA_PRIVATE_KEY is not set")) == "configuration: TPAGA_PRIVATE_KEY is not set"
    assert "401" in (explain(UnauthorizedError("x", http_status=401)) or "")
    assert "nothing was sent" in (explain(NotSentError("connection refused")) or "")
    assert explain(KeyError("bug")) is None
    assert explain(AssertionError("bug")) is None


def test_parse_when_takes_dates_times_and_zones() -> None:
    assert parse_when(None, "--since") is None
    assert parse_when("2026-01-31", "--since").isoformat() == "2026-01-31T00:00:00+00:00"  # type: ignore[union-attr]
    assert parse_when("2026-01-31T07:00:00-05:00", "--since").utcoffset().total_seconds() == -5 * 3600  # type: ignore[union-attr]
    with pytest.raises(click.BadParameter, match="not an ISO 8601"):
        parse_when("last tuesday", "--since")
