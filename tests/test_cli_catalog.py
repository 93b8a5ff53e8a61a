"""`billing plans|customers|cards|subscriptions`: happy paths against the emulator, and every bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text

from billing.db.engine import make_engine
from tests.test_cli_common import PRIVATE_KEY, Cli, make_cli, tokenize


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url)


@pytest.fixture
def gw(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """A harness whose gateway is the emulator."""
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url)


def _customer_with_card(gw: Cli, sandbox: Any, number: str = "4111111111111111") -> tuple[int, int]:
    customer = gw.json("customers", "create", "--email", "ana@example.com")["customer_id"]
    token = tokenize(sandbox, number)
    result = gw.ok("cards", "attach", "--customer", str(customer), "--token", "-", input=token + "\n")
    assert token not in result.output
    card = int(result.output.split()[1])
    return customer, card


# --- plans ---------------------------------------------------------------------------------------------


def test_plans_create_and_list(cli: Cli) -> None:
    out = cli.ok(
        "plans",
        "create",
        "--code",
        "gold",
        "--name",
        "Gold",
        "--amount",
        "45000",
        "--currency",
        "COP",
        "--interval",
        "month",
        "--interval-count",
        "1",
        "--trial-days",
        "0",
    ).output
    assert "plan 1 created: gold, 45000.00 COP every 1 month(s)" in out
    cli.ok("plans", "create", "--code", "usd-weekly", "--amount", "9.99", "--currency", "usd", "--interval", "week")
    plans = cli.json("plans", "list")
    assert [(p["code"], p["amount_minor"], p["currency"], p["interval"]) for p in plans] == [
        ("gold", 4_500_000, "COP", "month"),
        ("usd-weekly", 999, "USD", "week"),
    ]
    table = cli.ok("plans", "list").output
    assert "gold" in table and "45000.00 COP" in table and "9.99 USD" in table


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--amount", "12.5x"], "not a decimal amount: '12.5x'", 1),
        (["--amount", "-5"], "plan amount must be positive", 1),
        (["--amount", "0"], "plan amount must be positive", 1),
        (["--amount", "45000.50"], "COP amounts must be whole pesos", 1),
        (["--amount", "1.001", "--currency", "USD"], "more than 2 decimal places", 1),
        (["--amount", "45000", "--currency", "EUR"], "unknown currency 'EUR'", 1),
        (["--amount", "45000", "--interval", "fortnight"], "Invalid value for '--interval'", 2),
        (["--amount", "45000", "--interval-count", "0"], "interval_count must be a whole number from 1 to 120", 1),
        (["--amount", "45000", "--trial-days", "-1"], "trial_days must be a whole number from 0 to 730", 1),
        (["--amount", "45000", "--interval-count", "x"], "Invalid value for '--interval-count'", 2),
    ],
)
def test_plans_create_refuses_bad_input_and_changes_nothing(cli: Cli, args: list[str], message: str, code: int) -> None:
    cli.fails("plans", "create", "--code", "p", *args, match=message, code=code)
    assert cli.json("plans", "list") == []


def test_plans_create_refuses_a_bad_or_duplicate_code(cli: Cli) -> None:
    cli.fails("plans", "create", "--code", "has space", "--amount", "1000", match="plan code must be")
    cli.ok("plans", "create", "--code", "gold", "--amount", "1000")
    cli.fails("plans", "create", "--code", "gold", "--amount", "2000", match="a plan with code 'gold' already exists")
    cli.fails("plans", "create", "--amount", "2000", match="Missing option '--code'", code=2)


def test_empty_lists_say_so(cli: Cli) -> None:
    assert "no plans" in cli.ok("plans", "list").output
    assert "no customers" in cli.ok("customers", "list").output
    assert "no cards" in cli.ok("cards", "list").output
    assert "no subscriptions" in cli.ok("subscriptions", "list").output


# --- customers and cards ---------------------------------------------------------------------------------


def test_customers_create_at_the_gateway_and_list(gw: Cli) -> None:
    first = gw.json(
        "customers",
        "create",
        "--email",
        "ana@example.com",
        "--first-name",
        "Ana",
        "--last-name",
        "Gómez",
        "--merchant-id",
        "m-1",
    )["customer_id"]
    again = gw.json("customers", "create", "--email", "ana@example.com", "--merchant-id", "m-1")["customer_id"]
    assert again == first  # idempotent on the merchant id
    gw.ok("customers", "create", "--email", "bo@example.com")
    rows = gw.json("customers", "list")
    assert [r["email"] for r in rows] == ["bo@example.com", "ana@example.com"]
    assert rows[1]["merchant_customer_id"] == "m-1" and rows[1]["tpaga_customer_id"]
    table = gw.ok("customers", "list", "--limit", "1").output
    assert "bo@example.com" in table and "(1 of 2 shown" in table


def test_customers_create_reports_the_gateway_refusal(gw: Cli) -> None:
    gw.fails("customers", "create", "--email", "not-an-email", match="Tpaga rejected the request (HTTP 422)")
    gw.fails("customers", "create", "--email", "", match="must not be empty", code=2)
    assert gw.json("customers", "list") == []


def test_customers_create_without_a_private_key_is_a_configuration_error(gw: Cli) -> None:
    gw.fails(
        "customers",
        "create",
        "--email",
        "a@example.com",
        env={"TPAGA_PRIVATE_KEY": None},
        match="configuration: TPAGA_PRIVATE_KEY is not set",
    )


def test_customers_create_with_a_wrong_key_never_prints_the_key(gw: Cli) -> None:
    wrong = "sk_wrong_0123456789abcdef"
    result = gw.fails(
        "customers",
        "create",
        "--email",
        "a@example.com",
        env={"TPAGA_PRIVATE_KEY": wrong},
        match="Tpaga rejected the API key (HTTP 401)",
    )
    assert wrong not in result.output and PRIVATE_KEY not in result.output


def test_cards_attach_from_an_option_or_stdin_and_list_without_the_tpaga_id(gw: Cli, sandbox: Any) -> None:
    customer = gw.json("customers", "create", "--email", "ana@example.com")["customer_id"]
    token = tokenize(sandbox, "4111111111111111")
    out = gw.ok("cards", "attach", "--customer", str(customer), "--token", token).output
    assert f"attached to customer {customer}: VISA ****1111 (usable)" in out
    assert token not in out
    token2 = tokenize(sandbox, "5500000000000004")
    out = gw.ok("cards", "attach", "--customer", str(customer), "--token", "-", input=token2 + "\n").output
    assert "MASTERCARD ****0004" in out and token2 not in out
    rows = gw.json("cards", "list", "--customer", str(customer))
    assert [(r["brand"], r["last_four"], r["status"]) for r in rows] == [
        ("MASTERCARD", "0004", "usable"),
        ("VISA", "1111", "usable"),
    ]
    assert gw.json("cards", "list", "--customer", "999") == []
    # Neither the JSON nor the table carries the Tpaga card id.
    engine = make_engine(gw.env["DATABASE_URL"] or "")
    with engine.connect() as conn:
        tpaga_ids = [r[0] for r in conn.execute(text("select tpaga_card_id from cards"))]
    engine.dispose()
    listing = gw.ok("cards", "list").output + gw.ok("cards", "list", "--json").output
    assert tpaga_ids and not any(tpaga_id in listing for tpaga_id in tpaga_ids)
    assert "tpaga" not in listing.lower()


def test_cards_attach_a_card_whose_validation_fails_is_stored_unusable(gw: Cli, sandbox: Any) -> None:
    customer = gw.json("customers", "create", "--email", "ana@example.com")["customer_id"]
    out = gw.ok("cards", "attach", "--customer", str(customer), "--token", tokenize(sandbox, "4040000000000004"))
    assert "UNUSABLE: validation charge declined with 04" in out.output


def test_cards_attach_refuses_bad_input_without_echoing_the_token(gw: Cli, sandbox: Any) -> None:
    customer = gw.json("customers", "create", "--email", "ana@example.com")["customer_id"]
    token = tokenize(sandbox)
    result = gw.fails("cards", "attach", "--customer", "999", "--token", token, match="customer 999 does not exist")
    assert token not in result.output
    gw.fails(
        "cards", "attach", "--customer", str(customer), "--token", "-", input="\n", match="the token is empty", code=2
    )
    gw.fails("cards", "attach", "--customer", str(customer), "--token", "  ", match="the token is empty", code=2)
    gw.fails("cards", "attach", "--customer", "abc", "--token", token, match="Invalid value for '--customer'", code=2)
    first = gw.ok("cards", "attach", "--customer", str(customer), "--token", token).output
    # A temporary token is single use: the same token again answers with the first card, without spending
    # it at Tpaga a second time (which would be Tpaga's 422).
    again = gw.ok("cards", "attach", "--customer", str(customer), "--token", "-", input=token).output
    assert again == first and token not in again
    assert len(gw.json("cards", "list")) == 1
    stats = requests.get(sandbox.base_url + "__sandbox/stats", timeout=10).json()
    assert stats["requests"]["POST customer/credit_card_token"] == 1


# --- subscriptions -------------------------------------------------------------------------------------


def test_subscriptions_create_list_and_cancel(gw: Cli, sandbox: Any) -> None:
    plan = gw.json("plans", "create", "--code", "gold", "--amount", "45000")["plan_id"]
    trial = gw.json("plans", "create", "--code", "trial", "--amount", "45000", "--trial-days", "14")["plan_id"]
    customer, card = _customer_with_card(gw, sandbox)
    out = gw.ok("subscriptions", "create", "--customer", str(customer), "--plan", str(plan)).output
    assert "subscription 1 created (active); first charge due" in out
    created = gw.json("subscriptions", "create", "--customer", str(customer), "--plan", str(trial), "--card", str(card))
    assert created["status"] == "trialing"
    no_trial = gw.json(
        "subscriptions", "create", "--customer", str(customer), "--plan", str(trial), "--trial-days", "0"
    )
    assert no_trial["status"] == "active"
    rows = gw.json("subscriptions", "list")
    assert [r["status"] for r in rows] == ["active", "trialing", "active"]
    assert [r["id"] for r in gw.json("subscriptions", "list", "--status", "trialing")] == [2]
    assert "gold" in gw.ok("subscriptions", "list", "--customer", str(customer)).output

    out = gw.ok("subscriptions", "cancel", "2", "--at-period-end").output
    assert "subscription 2 will be canceled at" in out
    assert "subscription 1 canceled" in gw.ok("subscriptions", "cancel", "1").output
    assert "already canceled" in gw.ok("subscriptions", "cancel", "1").output
    assert "no paid invoice to refund" in gw.ok("subscriptions", "cancel", "3", "--refund-last-charge").output
    assert [r["id"] for r in gw.json("subscriptions", "list", "--status", "canceled")] == [3, 1]


def test_subscriptions_refuse_unknown_ids_and_bad_input(gw: Cli, sandbox: Any) -> None:
    plan = gw.json("plans", "create", "--code", "gold", "--amount", "45000")["plan_id"]
    customer, card = _customer_with_card(gw, sandbox)
    bare = gw.json("customers", "create", "--email", "bare@example.com")["customer_id"]
    gw.fails("subscriptions", "create", "--customer", "999", "--plan", str(plan), match="customer 999 does not exist")
    gw.fails("subscriptions", "create", "--customer", str(customer), "--plan", "999", match="plan 999 does not exist")
    gw.fails(
        "subscriptions",
        "create",
        "--customer",
        str(customer),
        "--plan",
        str(plan),
        "--card",
        "999",
        match="card 999 does not belong to customer",
    )
    gw.fails(
        "subscriptions",
        "create",
        "--customer",
        str(bare),
        "--plan",
        str(plan),
        "--card",
        str(card),
        match=f"card {card} does not belong to customer {bare}",
    )
    gw.fails("subscriptions", "create", "--customer", str(bare), "--plan", str(plan), match="has no usable card")
    gw.fails(
        "subscriptions",
        "create",
        "--customer",
        str(customer),
        "--plan",
        str(plan),
        "--trial-days",
        "-3",
        match="trial_days must be a whole number",
    )
    gw.fails("subscriptions", "list", "--status", "zombie", match="Invalid value for '--status'", code=2)
    gw.fails("subscriptions", "cancel", "999", match="subscription 999 does not exist")
    gw.fails("subscriptions", "cancel", "one", match="Invalid value for 'SUBSCRIPTION_ID'", code=2)
    assert gw.json("subscriptions", "list") == []
