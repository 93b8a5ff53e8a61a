"""Who did what: operator actions recorded with `--by`/`--reason`, `billing invoices list` and
`billing subscriptions show` (one subscription's timeline), against the emulator over real HTTP."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select, update

from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Event, Subscription
from tests.test_cli_common import Cli, ledger, make_cli
from tests.test_cli_ops import APPROVES, DECLINES_51, invoice_of, subscribe


@pytest.fixture
def gw(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    # getpass.getuser() reads LOGNAME first, then USER: the operator's login.
    return make_cli(sqlite_url, api_url=sandbox.api_url, LOGNAME="bob", USER="bob")


def actions(cli: Cli) -> list[dict[str, Any]]:
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    try:
        with make_session_factory(engine)() as s:
            rows = s.execute(select(Event).where(Event.kind == "operator.action").order_by(Event.id)).scalars()
            return [
                {"subscription_id": e.subscription_id, "invoice_id": e.invoice_id, "refund_id": e.refund_id, **e.data}
                for e in rows
            ]
    finally:
        engine.dispose()


def drop_next_answer(cli: Cli, sandbox: Any) -> None:
    """The next charge is made at Tpaga and its answer lost: its invoice goes to review."""
    requests.post(sandbox.base_url + "__sandbox/faults", json={"nextCharges": ["drop"]}, timeout=10).raise_for_status()
    cli.ok("tick", env={"TPAGA_READ_TIMEOUT": "1"})


def pause(cli: Cli) -> None:
    from billing.services.pause import pause_billing

    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with make_session_factory(engine)() as session, session.begin():
        pause_billing(session, datetime.now(UTC), "merchant_decline", "03")
    engine.dispose()


def test_every_operator_action_that_changes_state_records_who_and_why(gw: Cli, sandbox: Any) -> None:
    charged = subscribe(gw, sandbox, APPROVES)
    drop_next_answer(gw, sandbox)
    refused = subscribe(gw, sandbox, APPROVES)
    requests.post(sandbox.base_url + "__sandbox/faults", json={"nextCharges": ["5xx"]}, timeout=10)
    gw.ok("tick")
    [made] = [c for c in ledger(sandbox)["charges"] if c["orderId"].startswith(f"inv{invoice_of(gw, charged)}-")]

    gw.ok("review", "resolve", str(invoice_of(gw, charged)), "--charged", "--charge-id", made["id"])
    gw.ok(
        "review", "resolve", str(invoice_of(gw, refused)), "--not-charged", "--by", "ana", "--reason", "not in report"
    )
    gw.ok("tick")
    gw.ok("refund", str(invoice_of(gw, refused)), "--reason", "customer asked", "--by", "carla")
    pause(gw)
    gw.ok("resume", "--reason", "merchant account fixed with Tpaga")
    gw.ok("subscriptions", "cancel", str(charged), "--by", "ana", "--reason", "fraud")

    assert [(a["action"], a["by"], a["reason"]) for a in actions(gw)] == [
        ("review.resolve", "bob", None),
        ("review.resolve", "ana", "not in report"),
        ("refund.request", "carla", "customer asked"),
        ("billing.resume", "bob", "merchant account fixed with Tpaga"),
        ("subscription.cancel", "ana", "fraud"),
    ]
    resolved, not_charged, refund, resumed, canceled = actions(gw)
    assert (resolved["invoice_id"], resolved["outcome"], resolved["charge_id"]) == (
        invoice_of(gw, charged),
        "approved",
        made["id"],
    )
    assert (not_charged["invoice_id"], not_charged["outcome"]) == (invoice_of(gw, refused), "not_charged")
    assert (refund["invoice_id"], refund["refund_id"], refund["state"]) == (invoice_of(gw, refused), 1, "requested")
    assert resumed["paused_for"] == "merchant_decline"
    assert (canceled["subscription_id"], canceled["at_period_end"]) == (charged, False)

    # An action that changes nothing records nothing.
    gw.ok("resume", "--reason", "again")
    gw.ok("refund", str(invoice_of(gw, refused)), "--reason", "asked twice")
    gw.ok("subscriptions", "cancel", str(charged), "--reason", "twice")
    assert len(actions(gw)) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--by", ""), "--by must be a non-empty string of at most 64 characters"),
        (("--by", "x" * 65), "--by must be a non-empty string of at most 64 characters"),
        (("--by", "ana\nroot"), "--by must not contain control characters"),
        (("--reason", "r" * 256), "--reason must be a non-empty string of at most 255 characters"),
        (("--reason", "\t"), "--reason must be a non-empty string"),
    ],
)
def test_a_bad_by_or_reason_is_refused_before_anything_changes(
    gw: Cli, sandbox: Any, args: tuple[str, ...], message: str
) -> None:
    sub = subscribe(gw, sandbox, APPROVES)
    pause(gw)

    gw.fails("resume", *args, match=message, code=2)
    gw.fails("subscriptions", "cancel", str(sub), *args, match=message, code=2)
    gw.fails("review", "resolve", "1", "--not-charged", *args, match=message, code=2)

    assert gw.json("status")["paused"] is not None
    assert [s["status"] for s in gw.json("subscriptions", "list")] == ["active"]
    assert actions(gw) == []


# --- invoices list -------------------------------------------------------------------------------------


def test_invoices_list_shows_each_invoice_with_its_attempts_and_refunds(gw: Cli, sandbox: Any) -> None:
    paid = subscribe(gw, sandbox, APPROVES)
    declined = subscribe(gw, sandbox, DECLINES_51)
    gw.ok("tick")
    gw.ok("refund", str(invoice_of(gw, paid)), "--reason", "asked")

    every = gw.json("invoices", "list")
    only_declined = gw.json("invoices", "list", "--subscription", str(declined))
    only_paid = gw.json("invoices", "list", "--state", "paid")
    table = gw.ok("invoices", "list").output

    assert [i["subscription_id"] for i in every] == [declined, paid]  # newest first
    [inv] = only_declined
    assert inv["state"] == "open" and inv["amount"] == "45000.00" and inv["currency"] == "COP"
    [attempt] = inv["attempts"]
    assert (attempt["state"], attempt["error_code"], attempt["decline_class"]) == ("declined", "51", "soft")
    assert attempt["order_id"] == f"inv{inv['id']}-a1"
    [paid_inv] = only_paid
    assert [(r["state"], r["reason"]) for r in paid_inv["refunds"]] == [("requested", "asked")]
    assert "1 declined 51" in table and "1 approved" in table and "1 requested" in table
    assert "no invoices match" in gw.ok("invoices", "list", "--state", "uncollectible").output
    gw.fails("invoices", "list", "--state", "lost", match="Invalid value for '--state'", code=2)
    gw.fails("invoices", "list", "--subscription", "0", match="Invalid value for '--subscription'", code=2)
    assert "(1 of 2 shown; use --limit for more)" in gw.ok("invoices", "list", "--limit", "1").output


# --- subscriptions show --------------------------------------------------------------------------------


def set_external_id(cli: Cli, subscription_id: int, external_id: str) -> None:
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    with make_session_factory(engine)() as session, session.begin():
        session.execute(update(Subscription).where(Subscription.id == subscription_id).values(external_id=external_id))
    engine.dispose()


def test_subscriptions_show_tells_one_subscriptions_story_in_time_order(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, DECLINES_51)
    other = subscribe(gw, sandbox, APPROVES)
    gw.ok("tick")
    gw.ok("subscriptions", "cancel", str(sub), "--by", "ana", "--reason", "asked by phone")
    set_external_id(gw, sub, "shop:sub-42")

    story = gw.json("subscriptions", "show", str(sub))
    by_external = gw.json("subscriptions", "show", "--external-id", "shop:sub-42")
    text = gw.ok("subscriptions", "show", str(sub)).output

    assert by_external == story
    assert story["subscription"]["status"] == "canceled" and story["subscription"]["external_id"] == "shop:sub-42"
    [invoice] = story["invoices"]
    assert invoice["state"] == "void" and invoice["attempts"][0]["error_code"] == "51"
    kinds = [e["kind"] for e in story["timeline"]]
    times = [datetime.fromisoformat(e["at"]) for e in story["timeline"]]
    assert times == sorted(times)
    assert kinds.index("subscription") < kinds.index("invoice") < kinds.index("attempt")
    assert kinds.index("attempt") < kinds.index("operator.action") <= kinds.index("subscription.canceled") + 1
    [action] = [e for e in story["timeline"] if e["kind"] == "operator.action"]
    assert action["data"]["by"] == "ana" and action["data"]["reason"] == "asked by phone"
    # Nothing of the other subscription, and no card id or token in what an operator sees.
    other_invoice = invoice_of(gw, other)
    assert all(e.get("invoice_id") in (None, invoice["id"]) for e in story["timeline"]), other_invoice
    assert f"subscription {sub} (external id shop:sub-42): canceled" in text
    assert "charge inv" in text and "errorCode 51 (soft)" in text
    assert "OPERATOR ana: subscription.cancel, reason 'asked by phone'" in text


def test_subscriptions_show_refuses_what_names_nothing(gw: Cli) -> None:
    gw.fails("subscriptions", "show", "99", match="subscription 99 does not exist")
    gw.fails("subscriptions", "show", "--external-id", "nope", match="no subscription has external id 'nope'")
    gw.fails("subscriptions", "show", match="give a subscription id or --external-id", code=2)
    gw.fails(
        "subscriptions", "show", "1", "--external-id", "x", match="give a subscription id or --external-id", code=2
    )
    gw.fails("subscriptions", "show", "abc", match="'abc' is not a valid integer", code=2)


def test_pause_resume_and_cancel_by_external_id_record_who_and_why_with_the_command(gw: Cli, sandbox: Any) -> None:
    sub = subscribe(gw, sandbox, APPROVES)
    set_external_id(gw, sub, "shop:sub-7")

    gw.ok("subscriptions", "pause", "--external-id", "shop:sub-7", "--by", "ana", "--reason", "card dispute")
    gw.ok("subscriptions", "pause", "--external-id", "shop:sub-7", "--reason", "again")  # already paused
    gw.ok("subscriptions", "resume", str(sub), "--reason", "dispute settled")
    gw.ok("subscriptions", "cancel", "--external-id", "shop:sub-7", "--at-period-end", "--by", "ana")

    assert [(a["action"], a["by"], a["reason"], a["subscription_id"]) for a in actions(gw)] == [
        ("subscription.pause", "ana", "card dispute", sub),
        ("subscription.resume", "bob", "dispute settled", sub),
        ("subscription.cancel", "ana", None, sub),
    ]
    assert actions(gw)[-1]["at_period_end"] is True
    gw.fails("subscriptions", "resume", str(sub), "--by", "", match="--by must be a non-empty string", code=2)
