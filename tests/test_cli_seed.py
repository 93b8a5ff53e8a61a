"""`billing seed`, and the issue's end-to-end check: seed, tick, and a status that agrees with the ledger."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from billing.cli.seed import APPROVING_CARDS, MIX, allocate
from tests.test_cli_common import PRIVATE_KEY, Cli, assert_agrees_with_ledger, db_attempts, ledger, make_cli


@pytest.fixture
def gw(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url)


# --- the card mix --------------------------------------------------------------------------------------


def test_the_mix_has_the_documented_shares_exactly_at_100() -> None:
    kinds = Counter(kind.name for kind, _ in allocate(MIX, 100, random.Random(1)))
    assert kinds == {k.name: k.percent for k in MIX}
    assert kinds["approve"] == 73 and kinds["51"] == 10 and kinds["9999"] == 1


@pytest.mark.parametrize("n", [1, 7, 30, 101, 1000])
def test_the_mix_always_allocates_n_cards_from_the_test_table(n: int) -> None:
    from billing.sandbox.cards import TEST_CARDS

    plan = allocate(MIX, n, random.Random(n))
    assert len(plan) == n
    assert all(number in TEST_CARDS and number in kind.numbers for kind, number in plan)


def test_the_same_seed_gives_the_same_cards() -> None:
    assert allocate(MIX, 50, random.Random(7)) == allocate(MIX, 50, random.Random(7))
    assert allocate(MIX, 50, random.Random(7)) != allocate(MIX, 50, random.Random(8))


# --- seeding -------------------------------------------------------------------------------------------


def test_seed_approve_creates_customers_cards_plan_and_due_subscriptions(gw: Cli, sandbox: Any) -> None:
    summary = gw.json("seed", "--subscriptions", "12", "--cards", "approve", "--threads", "4", "--seed", "3")
    assert summary["customers"] == summary["subscriptions"] == 12 and summary["failed"] == 0
    assert summary["by_card_kind"] == {"approve": {"created": 12, "failed": 0}}
    assert summary["seed"] == 3 and summary["elapsed_seconds"] > 0
    cards = gw.json("cards", "list", "--limit", "100")
    assert len(cards) == 12 and {c["last_four"] for c in cards} <= {n[-4:] for n in APPROVING_CARDS}
    assert all(c["status"] == "usable" for c in cards)
    [plan] = gw.json("plans", "list")
    assert (plan["code"], plan["amount_minor"], plan["interval"]) == ("seed-monthly", 4_500_000, "month")
    subs = gw.json("subscriptions", "list", "--limit", "100")
    assert len(subs) == 12 and {s["status"] for s in subs} == {"active"}
    # A second run reuses the plan and adds new customers (unique merchant ids per run).
    out = gw.ok("seed", "--subscriptions", "3", "--cards", "approve", "--plan-amount", "50000")
    assert "reusing plan 'seed-monthly' at 45000.00 COP" in out.output
    assert "seeded 3 customers and 3 subscriptions" in out.output
    assert "card kind" in out.output and "/s" in out.output
    assert len(gw.json("plans", "list")) == 1
    assert len(gw.json("customers", "list", "--limit", "100")) == 15


def test_seed_refuses_bad_options(gw: Cli) -> None:
    gw.fails("seed", "--subscriptions", "5", "--cards", "decline", match="Invalid value for '--cards'", code=2)
    gw.fails("seed", "--subscriptions", "0", match="Invalid value for '--subscriptions'", code=2)
    gw.fails("seed", match="Missing option '--subscriptions'", code=2)
    gw.fails("seed", "--subscriptions", "5", "--plan-amount", "lots", match="not a decimal amount")
    gw.fails("seed", "--subscriptions", "5", "--plan-amount", "100.5", match="COP amounts must be whole pesos")
    gw.fails("seed", "--subscriptions", "5", "--threads", "0", match="Invalid value for '--threads'", code=2)
    assert gw.json("customers", "list") == []


def test_seed_needs_both_keys(gw: Cli) -> None:
    gw.fails("seed", "--subscriptions", "2", env={"TPAGA_PUBLIC_KEY": None}, match="TPAGA_PUBLIC_KEY is not set")
    gw.fails("seed", "--subscriptions", "2", env={"TPAGA_PRIVATE_KEY": None}, match="TPAGA_PRIVATE_KEY is not set")


def test_seed_with_a_wrong_key_fails_once_without_printing_it(gw: Cli) -> None:
    wrong = "sk_wrong_0123456789abcdef"
    result = gw.fails(
        "seed", "--subscriptions", "50", env={"TPAGA_PRIVATE_KEY": wrong}, match="Tpaga rejected the API key (HTTP 401)"
    )
    assert wrong not in result.output and PRIVATE_KEY not in result.output
    assert gw.json("customers", "list") == []


def test_seed_against_an_unreachable_gateway_fails_fast(gw: Cli) -> None:
    gw.fails(
        "seed",
        "--subscriptions",
        "50",
        env={"TPAGA_API_URL": "http://127.0.0.1:9/api/", "TPAGA_CONNECT_TIMEOUT": "0.2"},
        match="could not reach Tpaga (nothing was sent)",
    )
    assert gw.json("customers", "list") == []


def test_seed_reports_per_customer_failures_and_keeps_the_rest(
    gw: Cli, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fourth card number fails the Luhn check, so the emulator refuses to tokenize it (422)."""
    import billing.cli.seed as seed_module

    def with_bad_numbers(kinds: Any, n: int, rng: random.Random) -> list[Any]:
        plan = allocate(kinds, n, rng)
        return [(kind, "4111111111111112" if i % 4 == 3 else number) for i, (kind, number) in enumerate(plan)]

    monkeypatch.setattr(seed_module, "allocate", with_bad_numbers)
    result = gw.fails(
        "seed", "--subscriptions", "40", "--cards", "approve", "--json", match="10 of 40 customers could not be seeded"
    )
    assert '"failed": 10' in result.stdout and "Tpaga rejected the request (HTTP 422)" in result.stdout
    assert len(gw.json("customers", "list", "--limit", "100")) == 30
    assert len(gw.json("subscriptions", "list", "--limit", "100")) == 30
    assert gw.json("tick")["charges"] == {"approved": 30}


# --- the end-to-end check of the issue -----------------------------------------------------------------


def _seed_tick_and_compare(cli: Cli, sandbox: Any, n: int) -> dict[str, Any]:
    url = cli.env["DATABASE_URL"] or ""
    summary = cli.json("seed", "--subscriptions", str(n), "--cards", "mix", "--seed", "42")
    assert summary["subscriptions"] == n and summary["failed"] == 0
    first = cli.json("tick")
    assert first["opened"] == n
    assert sum(first["charges"].values()) == n
    status: dict[str, Any] = cli.json("status")
    book = ledger(sandbox)
    assert_agrees_with_ledger(status, book, db_attempts(url))
    expected_paid = summary["by_card_kind"]["approve"]["created"]
    assert status["invoices"]["paid"] == expected_paid
    assert first["charges"]["approved"] == expected_paid
    assert sum(status["invoices"].values()) == n

    # A second tick changes nothing at the gateway: no charge twice, nothing new due today.
    second = cli.json("tick")
    assert second["opened"] == 0 and second["charges"] == {}
    assert ledger(sandbox) == book
    assert cli.json("status") == status
    return status


def test_end_to_end_seed_30_mix_tick_and_status_agree_with_the_ledger(gw: Cli, sandbox: Any) -> None:
    status = _seed_tick_and_compare(gw, sandbox, 30)
    # 30 cards of the mix: 22 approve; the 8 declines wait for dunning or a new card.
    assert status["invoices"] == {"paid": 22, "open": 8}
    assert status["attempts"] == {"approved": 22, "declined": 8}
    assert status["review"] == 0


def test_end_to_end_with_every_card_kind_including_review(gw: Cli, sandbox: Any) -> None:
    status = _seed_tick_and_compare(gw, sandbox, 100)
    assert status["review"] == 1  # the one 9999 card
    assert status["invoices"]["paid"] == 73
    report = {(r["error_code"], r["state"]): r["count"] for r in gw.json("report")}
    assert report[("51", "declined")] == 12  # ten 51 cards and the two recovery cards' first charge


@pytest.mark.postgres
def test_end_to_end_on_postgresql(pg_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = make_cli(pg_url, api_url=sandbox.api_url)
    status = _seed_tick_and_compare(cli, sandbox, 30)
    assert status["invoices"] == {"paid": 22, "open": 8}
