"""`billing invoices list` and `billing subscriptions show`: what happened, for an operator who must act on it."""

from __future__ import annotations

from typing import Any

import click

from billing.cli.common import (
    ID,
    database_option,
    echo_json,
    echo_table,
    handle_errors,
    json_option,
    load_settings,
    session_scope,
)
from billing.domain.states import InvoiceState


@click.group()
def invoices() -> None:
    """Invoices (one per subscription period) with their charge attempts and refunds."""


def _attempts_cell(attempts: list[dict[str, Any]]) -> str:
    """`1 declined 51, 2 approved`: each attempt's number, state and Tpaga errorCode."""
    return ", ".join(
        f"{a['number']} {a['state']}" + (f" {a['error_code']}" if a["error_code"] not in (None, "00") else "")
        for a in attempts
    )


@invoices.command("list")
@click.option("--subscription", "subscription_id", type=ID, default=None, help="Only this subscription's invoices.")
@click.option(
    "--state", type=click.Choice([s.value for s in InvoiceState]), default=None, help="Only invoices in this state."
)
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="At most this many, newest first."
)
@json_option
@database_option
@handle_errors
def invoices_list(
    subscription_id: int | None, state: str | None, limit: int, as_json: bool, database_url: str | None
) -> None:
    """List invoices, newest first, each with its attempts (state and errorCode) and refunds.

    The invoice id is what `billing refund` and `billing review resolve` take.
    """
    from billing.services import timeline

    with session_scope(load_settings(database_url)) as session:
        rows, total = timeline.list_invoices(session, subscription_id=subscription_id, state=state, limit=limit)
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["invoice", "subscription", "period", "amount", "state", "due", "attempts", "refunds"],
        [
            (
                r["id"],
                r["subscription_id"],
                r["period_index"],
                f"{r['amount']} {r['currency']}",
                r["state"],
                r["due_at"],
                _attempts_cell(r["attempts"]) or None,
                ", ".join(f"{f['id']} {f['state']}" for f in r["refunds"]) or None,
            )
            for r in rows
        ],
        empty="no invoices" + (" match" if subscription_id or state else ""),
    )
    if total > len(rows):
        click.echo(f"({len(rows)} of {total} shown; use --limit for more)")


_DATA_SHOWN = ("action", "by", "reason", "outcome", "error_code", "charge_id", "order_id", "amount", "report")


def _describe(entry: dict[str, Any]) -> str:
    kind = entry["kind"]
    if kind == "subscription":
        return f"subscription created (now {entry['status_now']})"
    if kind == "invoice":
        return (
            f"invoice {entry['invoice_id']} opened for period {entry['period_index']}, "
            f"{entry['amount']} {entry['currency']} (now {entry['state_now']})"
        )
    if kind == "attempt":
        detail = [f"now {entry['state_now']}"]
        if entry["error_code"] not in (None, "00"):
            detail.append(f"errorCode {entry['error_code']} ({entry['decline_class']})")
        if entry["unknown_reason"]:
            detail.append(f"was unknown: {entry['unknown_reason']}")
        return f"charge {entry['order_id']} sent ({', '.join(detail)})"
    if kind == "refund":
        return f"refund {entry['refund_id']} requested of invoice {entry['invoice_id']} (now {entry['state_now']})"
    data = entry.get("data") or {}
    ids = " ".join(f"{k.split('_')[0]} {entry[k]}" for k in ("invoice_id", "attempt_id", "refund_id") if k in entry)
    shown = " ".join(
        f"{k}={data[k]!r}" if isinstance(data[k], str) else f"{k}={data[k]}"
        for k in _DATA_SHOWN
        if data.get(k) is not None
    )
    if kind == "operator.action":
        return (
            f"OPERATOR {data.get('by')}: {data.get('action')}"
            + (f" ({ids})" if ids else "")
            + (f", reason {data['reason']!r}" if data.get("reason") else "")
            + (f", outcome {data['outcome']}" if data.get("outcome") else "")
        )
    return f"event {kind}" + (f" ({ids})" if ids else "") + (f" {shown}" if shown else "")


@click.command("show")
@click.argument("subscription_id", type=ID, required=False)
@click.option("--external-id", default=None, help="Find the subscription by the sending app's id instead.")
@json_option
@database_option
@handle_errors
def subscriptions_show(
    subscription_id: int | None, external_id: str | None, as_json: bool, database_url: str | None
) -> None:
    """One subscription's timeline: its state, invoices, attempts with errorCodes, refunds, operator actions
    and events, oldest first."""
    from billing.services import timeline

    if (subscription_id is None) == (external_id is None):
        raise click.UsageError("give a subscription id or --external-id (one of them)")
    with session_scope(load_settings(database_url)) as session:
        sub = timeline.find_subscription(session, subscription_id, external_id)
        story = timeline.subscription_timeline(session, sub)
    if as_json:
        echo_json(story)
        return
    s = story["subscription"]
    plan = s["plan"]
    click.echo(
        f"subscription {s['id']}"
        + (f" (external id {s['external_id']})" if s["external_id"] else "")
        + f": {s['status']}, plan {plan['code']} ({plan['amount']} {plan['currency']} every {plan['every']}), "
        f"customer {s['customer_id']}"
    )
    for label, key in (
        ("next billing", "next_billing_at"),
        ("period", "current_period_start"),
        ("cancel at", "cancel_at"),
        ("canceled", "canceled_at"),
        ("paused", "paused_at"),
    ):
        if s[key]:
            value = f"{s[key]} to {s['current_period_end']}" if key == "current_period_start" else s[key]
            click.echo(f"  {label:<13} {value}")
    click.echo("")
    echo_table(
        ["invoice", "period", "amount", "state", "next attempt", "attempts", "refunds"],
        [
            (
                r["id"],
                r["period_index"],
                f"{r['amount']} {r['currency']}",
                r["state"],
                r["next_attempt_at"],
                _attempts_cell(r["attempts"]) or None,
                ", ".join(f"{f['id']} {f['state']}" for f in r["refunds"]) or None,
            )
            for r in story["invoices"]
        ],
        empty="no invoices yet",
    )
    click.echo("")
    for entry in story["timeline"]:
        click.echo(f"{entry['at']}  {_describe(entry)}")
