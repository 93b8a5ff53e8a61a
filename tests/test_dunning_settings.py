"""Choosing the dunning policy: BILLING_DUNNING_POLICY and its settings, their errors, and what an operator sees
(`billing subscriptions show` gives each invoice's next attempt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from billing.bootstrap import build_policy
from billing.config import ConfigError, Settings
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import ChargeAttempt, Invoice
from billing.domain.dunning import ColombiaPolicy, DunningPolicy
from tests.test_cli_common import Cli, make_cli
from tests.test_cli_ops import subscribe

DECLINES_91 = "4000000000910002"


def test_colombia_is_the_default_policy_with_a_21_day_window_at_nine() -> None:
    settings = Settings.from_env({})
    assert (settings.dunning_policy, settings.dunning_window_days, settings.dunning_payday_hour) == ("colombia", 21, 9)
    assert build_policy(settings) == ColombiaPolicy()


def test_the_policy_takes_its_settings() -> None:
    env = {"BILLING_DUNNING_WINDOW_DAYS": "60", "BILLING_DUNNING_PAYDAY_HOUR": "7"}
    env |= {"BILLING_DUNNING_FINAL_ACTION": "canceled"}
    assert build_policy(Settings.from_env(env)) == ColombiaPolicy(
        window_days=60, payday_hour=7, final_action="canceled"
    )


def test_the_fixed_policy_still_honours_the_retry_days() -> None:
    env = {"BILLING_DUNNING_POLICY": "fixed", "BILLING_DUNNING_RETRY_DAYS": "2,4"}
    assert build_policy(Settings.from_env(env)) == DunningPolicy(retry_days=(2, 4))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BILLING_DUNNING_WINDOW_DAYS": "61"}, "BILLING_DUNNING_WINDOW_DAYS must be <= 60, got 61"),
        ({"BILLING_DUNNING_WINDOW_DAYS": "0"}, "BILLING_DUNNING_WINDOW_DAYS must be >= 1, got 0"),
        ({"BILLING_DUNNING_WINDOW_DAYS": "3w"}, "BILLING_DUNNING_WINDOW_DAYS must be an integer"),
        ({"BILLING_DUNNING_PAYDAY_HOUR": "24"}, "BILLING_DUNNING_PAYDAY_HOUR must be <= 23, got 24"),
        ({"BILLING_DUNNING_POLICY": "stripe"}, "BILLING_DUNNING_POLICY must be 'colombia' or 'fixed', got 'stripe'"),
    ],
)
def test_a_bad_setting_is_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.fixture
def gw(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url)


def _counts(cli: Cli) -> tuple[int, int, list[Any]]:
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    try:
        with make_session_factory(engine)() as session:
            attempts = session.execute(select(func.count()).select_from(ChargeAttempt)).scalar_one()
            invoices = session.execute(select(func.count()).select_from(Invoice)).scalar_one()
            due = list(session.execute(select(Invoice.due_at).order_by(Invoice.id)).scalars())
            return attempts, invoices, due
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BILLING_DUNNING_WINDOW_DAYS": "61"}, "configuration: BILLING_DUNNING_WINDOW_DAYS must be <= 60, got 61"),
        ({"BILLING_DUNNING_POLICY": "nope"}, "configuration: BILLING_DUNNING_POLICY must be 'colombia' or 'fixed'"),
    ],
)
def test_a_bad_dunning_setting_stops_the_cli_with_one_line_and_charges_nothing(
    gw: Cli, sandbox: Any, env: dict[str, str], message: str
) -> None:
    subscribe(gw, sandbox, DECLINES_91)
    before = _counts(gw)
    result = gw.fails("tick", env=env, match=message)
    assert result.output.strip().count("\n") == 0  # one line
    assert _counts(gw) == before  # nothing charged, no invoice opened, nothing rescheduled


def test_subscriptions_show_gives_the_next_attempt_of_a_declined_invoice(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, DECLINES_91)
    gw.ok("tick")
    [invoice] = gw.json("subscriptions", "show", str(sub))["invoices"]
    _, _, [due_at] = _counts(gw)
    assert invoice["state"] == "open" and invoice["next_attempt_at"] == due_at.isoformat()  # a 91: in two hours
    table = gw.ok("subscriptions", "show", str(sub)).output
    assert "next attempt" in table and due_at.isoformat() in table
