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


def _commands(cli: Cli) -> list[tuple[str, str]]:
    """The command ledger, oldest first: (name, status)."""
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with engine.connect() as conn:
        rows = [(r[0], r[1]) for r in conn.execute(text("select name, status from commands order by id"))]
    engine.dispose()
    return rows


def _sql(cli: Cli, statement: str) -> None:
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


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


def test_plans_create_refuses_a_bad_code(cli: Cli) -> None:
    cli.fails("plans", "create", "--code", "has space", "--amount", "1000", match="plan code must be")
    cli.fails("plans", "create", "--amount", "2000", match="Missing option '--code'", code=2)
    cli.fails("plans", "create", "--code", "p", "--amount", "1000", "--name", "x" * 129, match="name must be")
    assert cli.json("plans", "list") == []


def test_plans_create_again_is_a_no_op_and_a_plan_in_use_keeps_its_terms(gw: Cli, sandbox: Any) -> None:
    # As billing.upsert_plan: the same terms again change nothing; an unused plan takes new terms; a used one
    # refuses them.
    first = gw.json("plans", "create", "--code", "gold", "--amount", "1000")
    assert first == {
        "plan_id": 1,
        "code": "gold",
        "created": True,
        "changed": True,
        "tax": "excluded",
        "tax_rate": 0,
    }
    out = gw.ok("plans", "create", "--code", "gold", "--amount", "1000.00").output
    assert "plan 1 unchanged (same terms): gold, 1000.00 COP" in out
    assert "plan 1 updated: gold, 2000.00 COP" in gw.ok("plans", "create", "--code", "gold", "--amount", "2000").output
    customer, _ = _customer_with_card(gw, sandbox)
    gw.ok("subscriptions", "create", "--customer", str(customer), "--plan-code", "gold")
    gw.fails(
        "plans",
        "create",
        "--code",
        "gold",
        "--amount",
        "3000",
        match="plan 'gold' is in use and its terms cannot change (plans are immutable once subscribed: make a new code)",
    )
    assert [p["amount_minor"] for p in gw.json("plans", "list")] == [200_000]
    assert _commands(gw)[-1] == ("billing.upsert_plan", "rejected")


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
    gw.fails("subscriptions", "cancel", "one", match="Invalid value for '[SUBSCRIPTION_ID]'", code=2)
    assert gw.json("subscriptions", "list") == []


# --- by external ids (the vocabulary of the tasks other apps send) -------------------------------------

ANA = ("--email", "ana@example.com", "--first-name", "Ana", "--last-name", "Gómez")


def _tpaga_requests(sandbox: Any, route: str) -> int:
    stats = requests.get(sandbox.base_url + "__sandbox/stats", timeout=10).json()
    return int(stats["requests"].get(route, 0))


def test_customers_create_by_external_id_creates_once_and_updates_after(gw: Cli, sandbox: Any) -> None:
    first = gw.json("customers", "create", *ANA, "--phone", "3001234567", "--external-id", "cus_1")
    assert first == {"external_id": "cus_1", "customer_id": 1, "created": True}
    out = gw.ok("customers", "create", "--email", "ana.g@example.com", "--first-name", "Ana", "--last-name", "G.",
                "--external-id", "cus_1").output  # fmt: skip
    assert "customer 1 (cus_1) updated" in out
    (row,) = gw.json("customers", "list")
    assert (row["external_id"], row["email"], row["last_name"]) == ("cus_1", "ana.g@example.com", "G.")
    assert row["tpaga_customer_id"]
    assert _tpaga_requests(sandbox, "POST customer") == 1  # created at Tpaga once; updates are kept here
    assert "cus_1" in gw.ok("customers", "list").output
    assert _commands(gw) == [("billing.upsert_customer", "applied")] * 2


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("--email", "a@example.com", "--external-id", "cus_1"), "--first-name and --last-name are required", 2),
        ((*ANA, "--external-id", "cus_1", "--merchant-id", "m-1"), "give --external-id or --merchant-id, not both", 2),
        ((*ANA, "--phone", "300"), "--phone is kept only for a customer with --external-id", 2),
        ((*ANA, "--external-id", "has space"), "external_id must be 1-64 characters", 1),
        ((*ANA, "--external-id", "c" * 65), "(65 characters)", 1),
        (
            ("--email", "not-an-email", "--first-name", "A", "--last-name", "B", "--external-id", "c"),
            "email must be",
            1,
        ),
        ((*ANA, "--external-id", "cus_1", "--phone", "3" * 33), "phone must be a string of 1 to 32", 1),
    ],
)
def test_customers_create_by_external_id_refuses_bad_input_and_changes_nothing(
    gw: Cli, sandbox: Any, args: tuple[str, ...], message: str, code: int
) -> None:
    gw.fails("customers", "create", *args, match=message, code=code)
    assert gw.json("customers", "list") == []
    assert _tpaga_requests(sandbox, "POST customer") == 0


def test_customers_create_by_external_id_refuses_at_once_while_another_process_creates_it(gw: Cli) -> None:
    # A worker holds the customer's lease while it calls Tpaga: a worker would wait; the CLI says so and stops.
    _sql(gw, "insert into customers (merchant_customer_id, email, first_name, last_name, created_at, "
             "tpaga_lease_expires_at) values ('cus_1', 'a@example.com', 'A', 'B', '2026-01-01 00:00:00', "
             "'2999-01-01 00:00:00')")  # fmt: skip
    gw.fails(
        "customers",
        "create",
        *ANA,
        "--external-id",
        "cus_1",
        match="customer 'cus_1' is being created at Tpaga by another worker; nothing was changed: try again in a moment",
    )
    assert gw.json("customers", "list")[0]["email"] == "a@example.com"
    assert _commands(gw) == [("billing.upsert_customer", "rejected")]


def test_cards_attach_by_customer_external_id(gw: Cli, sandbox: Any) -> None:
    gw.ok("customers", "create", *ANA, "--external-id", "cus_1")
    token = tokenize(sandbox)
    out = gw.ok("cards", "attach", "--customer-external-id", "cus_1", "--token", "-", input=token).output
    assert "card 1 attached to customer 1 (cus_1): VISA ****1111 (usable)" in out and token not in out
    again = gw.ok("cards", "attach", "--customer-external-id", "cus_1", "--token", token).output
    assert again == out  # the single-use token's first result
    assert _tpaga_requests(sandbox, "POST customer/credit_card_token") == 1


def test_cards_attach_refuses_an_unknown_or_missing_customer_without_echoing_the_token(gw: Cli, sandbox: Any) -> None:
    token = tokenize(sandbox)
    attach = ("cards", "attach", "--token", token)
    result = gw.fails(*attach, "--customer-external-id", "nobody", match="customer 'nobody' does not exist")
    assert token not in result.output and "(yet)" not in result.output
    assert _commands(gw) == [("billing.attach_card", "rejected")]  # recorded as a worker records giving up
    gw.fails(*attach, "--customer-external-id", "no body", match="external_customer_id must be 1-64 characters")
    gw.fails(*attach, match="give exactly one of --customer or --customer-external-id", code=2)
    gw.fails(*attach, "--customer", "1", "--customer-external-id", "x", match="give exactly one of", code=2)
    # A customer still pending at Tpaga (its creating worker has not finished): refused at once, token unspent.
    _sql(gw, "insert into customers (merchant_customer_id, email, created_at, tpaga_lease_expires_at) values "
             "('cus_2', 'a@example.com', '2026-01-01 00:00:00', '2999-01-01 00:00:00')")  # fmt: skip
    result = gw.fails(
        *attach,
        "--customer-external-id",
        "cus_2",
        match="customer cus_2 is not yet created at Tpaga; nothing was changed: try again in a moment",
    )
    assert token not in result.output
    assert gw.json("cards", "list") == []
    assert _tpaga_requests(sandbox, "POST customer/credit_card_token") == 0


def test_subscriptions_by_external_ids_create_pause_resume_and_cancel(gw: Cli, sandbox: Any) -> None:
    gw.ok("plans", "create", "--code", "gold", "--amount", "45000")
    gw.ok("plans", "create", "--code", "silver", "--amount", "20000")
    gw.ok("customers", "create", *ANA, "--external-id", "cus_1")
    create = ("subscriptions", "create", "--external-id", "sub_1", "--customer-external-id", "cus_1")
    out = gw.ok(*create, "--plan-code", "gold").output
    # No card yet: a command-created subscription waits for one (as billing.create_subscription does).
    assert "subscription 1 (sub_1) created (active); first charge due" in out
    assert "the customer has no usable card yet" in out
    assert "subscription 1 (sub_1) already exists with these terms (active)" in gw.ok(*create, "--plan", "1").output
    gw.fails(*create, "--plan-code", "silver", match="subscription 'sub_1' exists with other terms")
    # --customer ID of a customer that has an external id is the same customer.
    by_id = gw.json("subscriptions", "create", "--external-id", "sub_2", "--customer", "1", "--plan-code", "silver")
    assert (by_id["external_id"], by_id["created"], by_id["card_id"]) == ("sub_2", True, None)

    out = gw.ok("subscriptions", "pause", "--external-id", "sub_1").output
    assert out.strip() == "subscription 1 (sub_1) paused until `billing subscriptions resume`"
    assert "was already paused" in gw.ok("subscriptions", "pause", "1").output
    (listed,) = [r for r in gw.json("subscriptions", "list") if r["external_id"] == "sub_1"]
    assert listed["paused_at"] and listed["next_billing_at"] is None
    assert "active (paused)" in gw.ok("subscriptions", "list").output
    assert (
        "subscription 1 (sub_1) resumed (active)" in gw.ok("subscriptions", "resume", "--external-id", "sub_1").output
    )
    assert "subscription 1 (sub_1) was not paused" in gw.ok("subscriptions", "resume", "1").output
    resumes = gw.json("subscriptions", "pause", "--external-id", "sub_2", "--resumes-at", "2999-01-01T00:00:00-05:00")
    assert resumes["paused"] is True

    out = gw.ok("subscriptions", "cancel", "--external-id", "sub_1").output
    assert out.strip() == "subscription 1 (sub_1) canceled"
    assert "already canceled" in gw.ok("subscriptions", "cancel", "--external-id", "sub_1").output
    gw.fails("subscriptions", "pause", "--external-id", "sub_1", match="subscription 'sub_1' is canceled")
    assert {name for name, _ in _commands(gw)} >= {
        "billing.create_subscription",
        "billing.pause_subscription",
        "billing.resume_subscription",
        "billing.cancel_subscription",
    }


def test_subscriptions_create_finds_customer_and_plan_by_external_id_and_code_without_one(
    gw: Cli, sandbox: Any
) -> None:
    gw.ok("plans", "create", "--code", "gold", "--amount", "45000")
    gw.ok("customers", "create", *ANA, "--external-id", "cus_1")
    gw.ok("cards", "attach", "--customer-external-id", "cus_1", "--token", tokenize(sandbox))
    made = gw.json("subscriptions", "create", "--customer-external-id", "cus_1", "--plan-code", "gold")
    assert (made["external_id"], made["card_id"], made["status"]) == (None, 1, "active")
    gw.fails(
        "subscriptions",
        "pause",
        str(made["subscription_id"]),
        match="subscription 1 has no external id (it was created without --external-id)",
    )


def test_subscriptions_by_external_ids_refuse_unknown_ids_and_bad_input(gw: Cli, sandbox: Any) -> None:
    gw.ok("plans", "create", "--code", "gold", "--amount", "45000")
    gw.ok("customers", "create", *ANA, "--external-id", "cus_1")
    bare = gw.json("customers", "create", "--email", "bare@example.com")["customer_id"]
    create = ("subscriptions", "create", "--external-id", "sub_1")
    gw.fails(
        *create, "--customer-external-id", "nobody", "--plan-code", "gold", match="customer 'nobody' does not exist"
    )
    gw.fails(*create, "--customer-external-id", "a b", "--plan-code", "gold", match="--customer-external-id must be")
    gw.fails(*create, "--customer-external-id", "cus_1", "--plan-code", "nope", match="plan 'nope' does not exist")
    gw.fails(*create, "--customer", "999", "--plan-code", "gold", match="customer 999 does not exist")
    gw.fails(*create, "--customer", str(bare), "--plan-code", "gold", match=f"customer {bare} has no external id")
    gw.fails(*create, "--plan-code", "gold", match="give exactly one of --customer or --customer-external-id", code=2)
    gw.fails(*create, "--customer-external-id", "cus_1", match="give exactly one of --plan or --plan-code", code=2)
    gw.fails(
        *create, "--customer-external-id", "cus_1", "--plan", "1", "--plan-code", "gold", match="exactly one", code=2
    )
    gw.fails(
        *create, "--customer-external-id", "cus_1", "--plan-code", "gold", "--card", "1", match="--card cannot", code=2
    )
    gw.fails(
        "subscriptions",
        "create",
        "--external-id",
        "sub 1",
        "--customer-external-id",
        "cus_1",
        "--plan-code",
        "gold",
        match="external_id must be 1-64 characters",
    )
    on = ("--customer-external-id", "cus_1", "--plan-code", "gold")
    gw.fails(*create, *on, "--anchor-at", "soon", match="'soon' is not an ISO 8601 date or time", code=2)
    gw.fails(*create, *on, "--anchor-at", "2001-01-01T00:00:00Z", match="anchor_at must not be in the past")
    gw.fails(*create, *on, "--trial-days", "-1", match="trial_days must be a whole number from 0 to 730")
    assert gw.json("subscriptions", "list") == []

    for verb in ("cancel", "pause", "resume"):
        result = gw.fails("subscriptions", verb, "--external-id", "nope", match="subscription 'nope' does not exist")
        assert "(yet)" not in result.output
        gw.fails("subscriptions", verb, "999", match="subscription 999 does not exist")
        gw.fails("subscriptions", verb, match="give exactly one of SUBSCRIPTION_ID or --external-id", code=2)
        gw.fails("subscriptions", verb, "1", "--external-id", "x", match="give exactly one of", code=2)
        gw.fails("subscriptions", verb, "--external-id", "a b", match="external_subscription_id must be 1-64")
    gw.ok(*create, *on)
    gw.fails(
        "subscriptions",
        "pause",
        "--external-id",
        "sub_1",
        "--resumes-at",
        "2001-01-01",
        match="resumes_at must be in the future",
    )
    gw.fails(
        "subscriptions",
        "pause",
        "--external-id",
        "sub_1",
        "--resumes-at",
        "later",
        match="'later' is not an ISO 8601",
        code=2,
    )
    (sub,) = gw.json("subscriptions", "list")
    assert sub["paused_at"] is None
    rejected = [name for name, status in _commands(gw) if status == "rejected"]
    assert rejected.count("billing.cancel_subscription") >= 1 and rejected.count("billing.pause_subscription") >= 2


def test_subscriptions_and_cards_work_on_the_shared_database_clock(
    sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database clock reads with a connection of its own: read inside a SQLite write transaction it waited
    # for that transaction's lock ("database is locked").
    monkeypatch.chdir(tmp_path)
    clocked = make_cli(sqlite_url, api_url=sandbox.api_url, clock="database")
    clocked.ok("plans", "create", "--code", "gold", "--amount", "45000")
    clocked.ok("customers", "create", *ANA, "--external-id", "cus_1")
    clocked.ok(
        "subscriptions", "create", "--external-id", "sub_1", "--customer-external-id", "cus_1", "--plan-code", "gold"
    )
    out = clocked.ok("cards", "attach", "--customer-external-id", "cus_1", "--token", tokenize(sandbox)).output
    assert "(usable)" in out
    (sub,) = clocked.json("subscriptions", "list")
    assert (sub["external_id"], sub["card_id"]) == ("sub_1", 1)
