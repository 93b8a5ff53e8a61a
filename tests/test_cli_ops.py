"""`billing tick|status|report|review|refund|resume|clock` against the emulator over real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Invoice
from tests.test_cli_common import Cli, ledger, make_cli, tokenize

APPROVES = "4111111111111111"
DECLINES_51 = "4000000000510000"
UNKNOWN_9999 = "4000000099990006"
RECOVERS = "4000000000770000"


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url)


@pytest.fixture
def gw(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url)


@pytest.fixture
def clocked(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The emulator as gateway and the database test clock."""
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url, clock="database")


def subscribe(cli: Cli, sandbox: Any, number: str, plan: int | None = None) -> int:
    """A customer with a card `number` on the plan (created once); returns the subscription id."""
    if plan is None:
        plans = cli.json("plans", "list")
        plan = (
            plans[0]["id"] if plans else cli.json("plans", "create", "--code", "gold", "--amount", "45000")["plan_id"]
        )
    customer = cli.json("customers", "create", "--email", "c@example.com")["customer_id"]
    cli.ok("cards", "attach", "--customer", str(customer), "--token", "-", input=tokenize(sandbox, number))
    return int(cli.json("subscriptions", "create", "--customer", str(customer), "--plan", str(plan))["subscription_id"])


def invoice_of(cli: Cli, subscription_id: int) -> int:
    """The id of the subscription's first invoice."""
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    try:
        with make_session_factory(engine)() as session:
            query = select(Invoice.id).where(Invoice.subscription_id == subscription_id)
            return int(session.execute(query.order_by(Invoice.period_index)).scalars().first() or 0)
    finally:
        engine.dispose()


def sandbox_now(sandbox: Any) -> datetime:
    return datetime.fromisoformat(requests.get(sandbox.base_url + "__sandbox/clock", timeout=10).json()["now"])


# --- tick and status -----------------------------------------------------------------------------------


def test_tick_charges_what_is_due_and_status_counts_it(gw: Cli, sandbox: Any) -> None:
    paid = subscribe(gw, sandbox, APPROVES)
    subscribe(gw, sandbox, DECLINES_51)
    report = gw.json("tick", "--threads", "2")
    assert report["opened"] == 2
    assert report["charges"] == {"approved": 1, "declined": 1}
    status = gw.json("status")
    assert status["invoices"] == {"paid": 1, "open": 1}
    assert status["attempts"] == {"approved": 1, "declined": 1}
    assert status["review"] == 0 and status["paused"] is None
    assert status["subscriptions"] == {"active": 1, "past_due": 1}
    table = gw.ok("status").output
    assert "invoices" in table and "paid 1" in table and "billing        running" in table
    out = gw.ok("tick").output  # nothing more is due today
    assert "opened       0 invoice(s)" in out and "charges      -" in out
    assert gw.json("status") == status
    assert len([c for c in ledger(sandbox)["charges"] if c["paid"]]) == 1
    assert invoice_of(gw, paid)


def test_status_json_is_exactly_the_report_dict(cli: Cli) -> None:
    from billing.services import reports

    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with make_session_factory(engine)() as session:
        expected = json.loads(json.dumps(reports.status(session), default=str))
    engine.dispose()
    got = cli.json("status")
    assert got == expected
    assert {"invoices", "attempts", "review"} <= set(got)


def test_tick_needs_the_private_key_before_it_touches_anything(cli: Cli) -> None:
    cli.fails("tick", env={"TPAGA_PRIVATE_KEY": None}, match="configuration: TPAGA_PRIVATE_KEY is not set")
    cli.fails("tick", "--threads", "0", match="Invalid value for '--threads'", code=2)


def test_tick_against_an_unreachable_gateway_records_not_sent_never_unknown(gw: Cli, sandbox: Any) -> None:
    subscribe(gw, sandbox, APPROVES)
    report = gw.json("tick", env={"TPAGA_API_URL": "http://127.0.0.1:9/api/", "TPAGA_CONNECT_TIMEOUT": "0.2"})
    assert report["charges"] == {"not_sent": 1}
    status = gw.json("status")
    assert status["review"] == 0 and "unknown" not in status["attempts"]
    assert gw.json("tick", env={"TPAGA_API_URL": "http://127.0.0.1:9/api/"})["charges"] in ({}, {"not_sent": 1})


# --- report --------------------------------------------------------------------------------------------


def test_report_groups_outcomes_by_error_code_and_class(gw: Cli, sandbox: Any) -> None:
    for number in (APPROVES, APPROVES, DECLINES_51, UNKNOWN_9999):
        subscribe(gw, sandbox, number)
    gw.ok("tick")
    rows = {(r["error_code"], r["state"]): r for r in gw.json("report")}
    assert rows[("00", "approved")]["count"] == 2
    assert rows[("00", "approved")]["amount_minor"] == 2 * 4_500_000
    assert rows[("00", "approved")]["class"] == "approved"
    assert rows[("51", "declined")]["class"] == "soft"
    assert sum(r["count"] for r in rows.values()) == 4
    table = gw.ok("report").output
    assert "errorCode" in table and "90000.00 COP" in table and "soft" in table
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert gw.json("report", "--since", tomorrow) == []
    assert len(gw.json("report", "--since", "2020-01-01", "--until", tomorrow)) == len(rows)
    assert "no charge attempts in that range" in gw.ok("report", "--until", "2020-01-01").output


def test_report_refuses_bad_times(cli: Cli) -> None:
    cli.fails("report", "--since", "yesterday", match="is not an ISO 8601 date or time", code=2)
    cli.fails("report", "--since", "2026-02-01", "--until", "2026-01-01", match="must be after --since", code=2)


# --- review --------------------------------------------------------------------------------------------


def test_review_list_and_resolve_not_charged(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, UNKNOWN_9999)
    gw.ok("tick")
    queue = gw.json("review", "list")
    invoice = invoice_of(gw, sub)
    assert [r["invoice_id"] for r in queue] == [invoice]
    assert queue[0]["order_id"] and "tpaga_charge_id" not in queue[0]
    assert f"{invoice}" in gw.ok("review", "list").output
    # The emulator did not charge a 9999: resolving as charged is refused after Tpaga's lookup says so.
    charge_id = ledger(sandbox)["charges"][0]["id"]
    gw.fails(
        "review",
        "resolve",
        str(invoice),
        "--charged",
        "--charge-id",
        charge_id,
        match="Tpaga says that charge is not paid",
    )
    gw.fails(
        "review", "resolve", str(invoice), "--charged", "--charge-id", "nope", match="Tpaga has no charge with that id"
    )
    out = gw.ok("review", "resolve", str(invoice), "--not-charged").output
    assert f"invoice {invoice} resolved as not charged" in out
    assert gw.json("review", "list") == []
    assert "the review queue is empty" in gw.ok("review", "list").output
    assert gw.json("status")["invoices"] == {"open": 1}


def test_review_resolve_charged_settles_the_invoice_as_paid(gw: Cli, sandbox: Any) -> None:
    """A charge that was made but whose response was dropped: the operator finds it and resolves it."""
    sub = subscribe(gw, sandbox, APPROVES)
    requests.post(sandbox.base_url + "__sandbox/faults", json={"dropRate": 1.0}, timeout=10).raise_for_status()
    gw.ok("tick", env={"TPAGA_READ_TIMEOUT": "1"})
    requests.post(sandbox.base_url + "__sandbox/faults", json={"dropRate": 0.0}, timeout=10).raise_for_status()
    invoice = invoice_of(gw, sub)
    assert [r["invoice_id"] for r in gw.json("review", "list")] == [invoice]
    [charge] = ledger(sandbox)["charges"]
    assert charge["paid"]
    out = gw.ok("review", "resolve", str(invoice), "--charged", "--charge-id", charge["id"]).output
    assert f"invoice {invoice} resolved as charged: paid" in out
    assert gw.json("status")["invoices"] == {"paid": 1}
    gw.ok("tick")
    assert len(ledger(sandbox)["charges"]) == 1  # never charged again


def test_review_resolve_refuses_bad_input(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, APPROVES)
    gw.ok("tick")
    paid = invoice_of(gw, sub)
    gw.fails("review", "resolve", str(paid), "--not-charged", match=f"invoice {paid} is not in review (state paid)")
    gw.fails("review", "resolve", "999", "--not-charged", match="invoice 999 does not exist")
    gw.fails("review", "resolve", str(paid), "--charged", match="--charged needs --charge-id", code=2)
    gw.fails("review", "resolve", str(paid), match="--charged --charge-id ID, or --not-charged", code=2)
    gw.fails(
        "review",
        "resolve",
        str(paid),
        "--not-charged",
        "--charge-id",
        "x",
        match="--charge-id goes with --charged",
        code=2,
    )


def fill_review_queue(cli: Cli, sandbox: Any, count: int) -> None:
    """`count` invoices in review: due subscriptions whose every charge the emulator answers with a 5xx."""
    cli.ok("seed", "--subscriptions", str(count), "--cards", "approve", "--threads", "4", "--seed", "1")
    requests.post(sandbox.base_url + "__sandbox/faults", json={"errorRate": 1.0}, timeout=10).raise_for_status()
    assert cli.json("tick", "--threads", "8")["charges"] == {"unknown": count}
    requests.post(sandbox.base_url + "__sandbox/faults", json={"errorRate": 0.0}, timeout=10).raise_for_status()


def test_review_list_says_how_many_are_in_review_and_pages_with_limit_page_and_all(gw: Cli, sandbox: Any) -> None:
    fill_review_queue(gw, sandbox, 103)

    table = gw.ok("review", "list").output
    default = gw.ok("review", "list", "--json")
    first_five = gw.ok("review", "list", "--json", "--limit", "5")
    second_page = gw.ok("review", "list", "--json", "--page", "2")
    third_of_fifty = gw.ok("review", "list", "--limit", "50", "--page", "3").output
    everything = gw.ok("review", "list", "--json", "--all")

    rows = [line for line in table.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 100
    assert table.rstrip().endswith("showing 1-100 of 103 (page 1 of 2); --page 2 for the next, --all for every one")
    page, page_count = json.loads(default.stdout), json.loads(default.stderr)
    assert len(page) == 100 and page_count == {"total": 103, "shown": 100, "page": 1, "pages": 2}
    assert json.loads(first_five.stdout) == page[:5]  # oldest first, the same order on every run
    assert json.loads(first_five.stderr) == {"total": 103, "shown": 5, "page": 1, "pages": 21}
    every = json.loads(everything.stdout)
    assert len({r["invoice_id"] for r in every}) == 103 and every[:100] == page
    assert json.loads(second_page.stdout) == every[100:]
    assert json.loads(second_page.stderr) == {"total": 103, "shown": 3, "page": 2, "pages": 2}
    assert third_of_fifty.rstrip().endswith("showing 101-103 of 103 (page 3 of 3); the last page, --all for every one")
    assert json.loads(everything.stderr) == {"total": 103, "shown": 103, "page": 1, "pages": 1}
    assert gw.ok("review", "list", "--all").output.rstrip().endswith("103 in review")
    assert "showing" not in gw.ok("review", "list", "--limit", "200").output
    past = gw.ok("review", "list", "--page", "3")
    assert "page 3 is past the end: 103 in review, 2 page(s) of 100" in past.output


def test_review_list_refuses_bad_limits_and_changes_nothing(gw: Cli, sandbox: Any) -> None:
    fill_review_queue(gw, sandbox, 2)
    before = gw.json("status")

    gw.fails("review", "list", "--limit", "0", match="Invalid value for '--limit'", code=2)
    gw.fails("review", "list", "--limit", "-1", match="Invalid value for '--limit'", code=2)
    gw.fails("review", "list", "--limit", "abc", match="'abc' is not a valid integer", code=2)
    gw.fails("review", "list", "--page", "0", match="Invalid value for '--page'", code=2)
    gw.fails("review", "list", "--all", "--limit", "5", match="--all and --limit exclude each other", code=2)
    gw.fails("review", "list", "--all", "--page", "2", match="--all and --page exclude each other", code=2)

    assert gw.json("status") == before
    assert len(gw.json("review", "list")) == 2


# --- refund and resume ---------------------------------------------------------------------------------


def test_refund_is_requested_then_executed_by_the_next_tick(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, APPROVES)
    gw.ok("tick")
    invoice = invoice_of(gw, sub)
    out = gw.ok("refund", str(invoice), "--reason", "customer asked").output
    assert "refund 1 requested (state requested); it runs on the next `billing tick`" in out
    again = gw.json("refund", str(invoice), "--reason", "asked twice")
    assert again == {"refund_id": 1, "state": "requested", "created": False}
    assert gw.json("tick")["refunds"] == {"voided": 1}
    assert gw.json("status")["refunds"] == {"voided": 1}
    [charge] = ledger(sandbox)["charges"]
    assert charge["voided"] is True
    assert gw.json("refund", str(invoice), "--reason", "again")["state"] == "voided"


def test_refund_refuses_bad_input(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, DECLINES_51)
    gw.ok("tick")
    gw.fails("refund", "999", "--reason", "x", match="invoice 999 does not exist")
    gw.fails("refund", str(invoice_of(gw, sub)), "--reason", "x", match="has no approved charge to refund")
    gw.fails("refund", "1", "--reason", " ", match="reason must be a non-empty string")
    gw.fails("refund", "1", match="Missing option '--reason'", code=2)


def test_subscription_cancel_with_refund_of_the_last_charge(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, APPROVES)
    gw.ok("tick")
    out = gw.ok("subscriptions", "cancel", str(sub), "--refund-last-charge").output
    assert f"subscription {sub} canceled" in out and "refund 1: requested" in out
    gw.ok("tick")
    assert ledger(sandbox)["charges"][0]["voided"] is True


def test_resume_lifts_a_pause(cli: Cli) -> None:
    from billing.services.pause import pause_billing

    assert "billing was not paused" in cli.ok("resume").output
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with make_session_factory(engine)() as session, session.begin():
        pause_billing(session, datetime.now(UTC), "merchant_decline", "03")
    engine.dispose()
    assert cli.json("status")["paused"]["reason"] == "merchant_decline"
    assert "BILLING PAUSED" in cli.ok("status").output and "errorCode 03" in cli.ok("status").output
    assert "billing resumed" in cli.ok("resume").output
    assert cli.json("status")["paused"] is None


# --- clock ---------------------------------------------------------------------------------------------


def test_clock_show_and_advance_the_database_clock(cli: Cli) -> None:
    env: dict[str, str | None] = {"BILLING_CLOCK": "database"}
    shown = cli.json("clock", "show", env=env)
    assert shown["offset_seconds"] == 0 and shown["clock"] == "database"
    assert "test clock advanced by 31 days" in cli.ok("clock", "advance", "31d", env=env).output
    cli.ok("clock", "advance", "12h", env=env)
    cli.ok("clock", "advance", "90m", env=env)
    cli.ok("clock", "advance", "3600s", env=env)
    assert "test clock advanced by 1 day 12 h to " in cli.ok("clock", "advance", "1d12h", env=env).output
    expected = 31 * 86400 + 12 * 3600 + 90 * 60 + 3600 + 36 * 3600
    assert cli.json("clock", "show", env=env)["offset_seconds"] == expected
    # as a person reads it (not timedelta's "33 days, 2:30:00"), then the exact seconds
    assert f"(offset 33 days 2 h 30 min, {expected}s)" in cli.ok("clock", "show", env=env).output
    note = cli.ok("clock", "show").output
    assert "BILLING_CLOCK is not 'database'" in note


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("1x", "'1x' is not a duration"),
        ("31", "'31' is not a duration"),
        ("d", "'d' is not a duration"),
        ("1.5d", "'1.5d' is not a duration"),
        ("-5d", "'-5d' is not a duration"),
        ("0s", "the duration must be positive"),
        ("0d0h", "the duration must be positive"),
        ("99999d", "at most 3660 days"),
    ],
)
def test_clock_advance_refuses_negative_zero_and_garbage_durations(cli: Cli, duration: str, message: str) -> None:
    env: dict[str, str | None] = {"BILLING_CLOCK": "database"}
    cli.fails("clock", "advance", "--", duration, env=env, match=message, code=2)
    assert cli.json("clock", "show", env=env)["offset_seconds"] == 0


def test_clock_advance_refuses_the_system_clock(cli: Cli) -> None:
    cli.fails("clock", "advance", "1d", match="BILLING_CLOCK is not 'database'")
    assert cli.json("clock", "show")["offset_seconds"] == 0


def test_clock_advance_moves_the_emulator_clock_in_step(clocked: Cli, sandbox: Any) -> None:
    before = sandbox_now(sandbox)
    out = clocked.ok("clock", "advance", "2d", "--sandbox-url", sandbox.base_url).output
    assert "sandbox clock advanced by 2 days" in out
    moved = sandbox_now(sandbox) - before
    assert timedelta(days=2) <= moved < timedelta(days=2, minutes=1)
    clocked.ok("clock", "advance", "1h", "--sandbox-url", sandbox.api_url)  # the API URL works too
    assert sandbox_now(sandbox) - before >= timedelta(days=2, hours=1)
    assert clocked.json("clock", "show")["offset_seconds"] == 2 * 86400 + 3600


def test_clock_advance_with_an_unreachable_sandbox_moves_neither_clock(clocked: Cli) -> None:
    clocked.fails("clock", "advance", "1d", "--sandbox-url", "http://127.0.0.1:9/", match="neither clock was moved")
    clocked.fails("clock", "advance", "1d", "--sandbox-url", "ftp://x/", match="is not an http(s) URL", code=2)
    assert clocked.json("clock", "show")["offset_seconds"] == 0


def test_months_of_dunning_on_the_shared_clock(clocked: Cli, sandbox: Any) -> None:
    """The recovery card declines 51 twice, then approves on the dunning schedule (retry days 1, 3, ...)."""
    clocked.env["BILLING_DUNNING_POLICY"] = "fixed"  # days from the first failure, whatever today's date
    sub = subscribe(clocked, sandbox, RECOVERS)
    assert clocked.json("tick")["charges"] == {"declined": 1}
    assert clocked.json("tick")["charges"] == {}  # not due again yet
    clocked.ok("clock", "advance", "1d", "--sandbox-url", sandbox.base_url)
    assert clocked.json("tick")["charges"] == {"declined": 1}
    clocked.ok("clock", "advance", "2d", "--sandbox-url", sandbox.base_url)
    assert clocked.json("tick")["charges"] == {"approved": 1}
    assert clocked.json("status")["invoices"] == {"paid": 1}
    clocked.ok("clock", "advance", "31d", "--sandbox-url", sandbox.base_url)
    report = clocked.json("tick")
    assert report["opened"] == 1 and report["charges"] == {"approved": 1}  # the card keeps approving now
    orders = [c["orderId"] for c in ledger(sandbox)["charges"] if c["paid"]]
    assert len(orders) == len(set(orders)) == 2
    assert invoice_of(clocked, sub)


def test_cancel_at_period_end_of_an_unpaid_subscription_takes_effect(clocked: Cli, sandbox: Any) -> None:
    """An unpaid subscription renews no more (no next billing time): 'at period end' can only mean now."""
    clocked.env["BILLING_DUNNING_POLICY"] = "fixed"  # its steps follow the fixed schedule's days
    sub = subscribe(clocked, sandbox, DECLINES_51)
    clocked.ok("tick")
    for step in ("1d1h", "2d", "2d", "2d"):  # the dunning retries at 1, 3, 5 and 7 days
        clocked.ok("clock", "advance", step, "--sandbox-url", sandbox.base_url)
        clocked.ok("tick")
    [row] = clocked.json("subscriptions", "list")
    assert row["status"] == "unpaid" and row["next_billing_at"] is None
    out = clocked.ok("subscriptions", "cancel", str(sub), "--at-period-end").output
    assert "canceled now: it no longer renews" in out
    clocked.ok("clock", "advance", "40d", "--sandbox-url", sandbox.base_url)
    clocked.ok("tick")
    assert [r["status"] for r in clocked.json("subscriptions", "list")] == ["canceled"]
