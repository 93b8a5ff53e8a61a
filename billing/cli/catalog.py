"""`billing plans|customers|cards|subscriptions`: the catalog, from the command line."""

from __future__ import annotations

import sys
from typing import Any

import click

from billing.cli.common import (
    ID,
    database_option,
    echo_json,
    echo_table,
    format_money,
    format_time,
    handle_errors,
    json_option,
    load_settings,
    open_context,
    session_scope,
)
from billing.domain.periods import Interval
from billing.domain.states import SubscriptionStatus

_LIMIT_HELP = "Show at most this many rows (newest first)."


def _limit_option(func: Any) -> Any:
    return click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help=_LIMIT_HELP)(
        func
    )


def _shown(total: int, rows: int) -> None:
    if total > rows:
        click.echo(f"({rows} of {total} shown; use --limit for more)")


# --- plans -----------------------------------------------------------------------------------------------


@click.group()
def plans() -> None:
    """Plans: what a subscription costs and how often it renews."""


@plans.command("create")
@click.option("--code", required=True, help="Unique plan code (letters, digits, '_', '.', '-').")
@click.option("--name", default=None, help="Display name [default: the code].")
@click.option("--amount", required=True, help="Price per period in major units, exact (e.g. 45000 or 45000.00).")
@click.option("--currency", default="COP", show_default=True, help="Currency code.")
@click.option(
    "--interval",
    type=click.Choice([i.value for i in Interval]),
    default="month",
    show_default=True,
    help="Billing interval.",
)
@click.option("--interval-count", default=1, show_default=True, type=int, help="Intervals per period (1-120).")
@click.option("--trial-days", default=0, show_default=True, type=int, help="Free days before the first charge.")
@json_option
@database_option
@handle_errors
def plans_create(
    code: str,
    name: str | None,
    amount: str,
    currency: str,
    interval: str,
    interval_count: int,
    trial_days: int,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Create a plan."""
    from billing.services import catalog

    money = catalog.money_from_input(amount, currency)
    with open_context(load_settings(database_url)) as ctx:
        plan_id = catalog.create_plan(
            ctx,
            code=code,
            name=name or code,
            amount=money,
            interval=interval,
            interval_count=interval_count,
            trial_days=trial_days,
        )
    if as_json:
        echo_json({"plan_id": plan_id, "code": code})
    else:
        click.echo(
            f"plan {plan_id} created: {code}, {format_money(money.amount_minor, money.currency)} "
            f"every {interval_count} {interval}(s)"
        )


@plans.command("list")
@json_option
@database_option
@handle_errors
def plans_list(as_json: bool, database_url: str | None) -> None:
    """List plans."""
    from sqlalchemy import select

    from billing.db.models import Plan

    with session_scope(load_settings(database_url)) as session:
        rows = session.execute(select(Plan).order_by(Plan.id)).scalars().all()
    if as_json:
        echo_json(
            [
                {
                    "id": p.id,
                    "code": p.code,
                    "name": p.name,
                    "amount_minor": p.amount_minor,
                    "currency": p.currency,
                    "interval": p.interval,
                    "interval_count": p.interval_count,
                    "trial_days": p.trial_days,
                }
                for p in rows
            ]
        )
        return
    echo_table(
        ["id", "code", "name", "amount", "every", "trial days"],
        [
            (
                p.id,
                p.code,
                p.name,
                format_money(p.amount_minor, p.currency),
                f"{p.interval_count} {p.interval}",
                p.trial_days,
            )
            for p in rows
        ],
        empty="no plans",
    )


# --- customers -------------------------------------------------------------------------------------------


@click.group()
def customers() -> None:
    """Customers (created at Tpaga, then here)."""


@customers.command("create")
@click.option("--email", required=True, help="The customer's email.")
@click.option("--first-name", default=None)
@click.option("--last-name", default=None)
@click.option("--merchant-id", default=None, help="Your own id for the customer; creating it again is a no-op.")
@json_option
@database_option
@handle_errors
def customers_create(
    email: str,
    first_name: str | None,
    last_name: str | None,
    merchant_id: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Create a customer at Tpaga and record it here."""
    from billing.services import catalog

    if not email.strip():
        raise click.BadParameter("must not be empty", param_hint="--email")
    with open_context(load_settings(database_url)) as ctx:
        customer_id = catalog.create_customer(
            ctx, email=email, first_name=first_name, last_name=last_name, merchant_customer_id=merchant_id
        )
    if as_json:
        echo_json({"customer_id": customer_id})
    else:
        click.echo(f"customer {customer_id} ready")


@customers.command("list")
@_limit_option
@json_option
@database_option
@handle_errors
def customers_list(limit: int, as_json: bool, database_url: str | None) -> None:
    """List customers."""
    from sqlalchemy import func, select

    from billing.db.models import Customer

    with session_scope(load_settings(database_url)) as session:
        total = session.execute(select(func.count()).select_from(Customer)).scalar_one()
        rows = session.execute(select(Customer).order_by(Customer.id.desc()).limit(limit)).scalars().all()
    if as_json:
        echo_json(
            [
                {
                    "id": c.id,
                    "email": c.email,
                    "first_name": c.first_name,
                    "last_name": c.last_name,
                    "merchant_customer_id": c.merchant_customer_id,
                    "tpaga_customer_id": c.tpaga_customer_id,
                    "created_at": c.created_at,
                }
                for c in rows
            ]
        )
        return
    echo_table(
        ["id", "email", "name", "merchant id", "tpaga customer", "created"],
        [
            (
                c.id,
                c.email,
                " ".join(x for x in (c.first_name, c.last_name) if x) or None,
                c.merchant_customer_id,
                c.tpaga_customer_id,
                format_time(c.created_at),
            )
            for c in rows
        ],
        empty="no customers",
    )
    _shown(total, len(rows))


# --- cards -----------------------------------------------------------------------------------------------


@click.group()
def cards() -> None:
    """Cards stored at Tpaga (shown by brand and last four; the Tpaga card id is never printed)."""


def _read_token(token: str) -> str:
    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        # Never echo what was given: it is a credential.
        raise click.BadParameter("the token is empty", param_hint="--token")
    return token


@cards.command("attach")
@click.option("--customer", "customer_id", required=True, type=ID, help="Customer id (ours).")
@click.option(
    "--token",
    required=True,
    metavar="TOKEN|-",
    help="The temporary token from tokenize; '-' reads it from stdin (keeps it out of shell history).",
)
@json_option
@database_option
@handle_errors
def cards_attach(customer_id: int, token: str, as_json: bool, database_url: str | None) -> None:
    """Associate a card with a customer from a temporary (single-use) token."""
    from billing.db.models import Card
    from billing.services import catalog

    temp_token = _read_token(token)
    settings = load_settings(database_url)
    with open_context(settings) as ctx:
        card_id = catalog.attach_card(ctx, customer_id=customer_id, token=temp_token)
        with ctx.sessions() as session:
            card = session.get(Card, card_id)
            assert card is not None
            info = {
                "card_id": card.id,
                "customer_id": card.customer_id,
                "brand": card.brand,
                "last_four": card.last_four,
                "status": card.status,
                "unusable_code": card.unusable_code,
            }
    if as_json:
        echo_json(info)
        return
    line = f"card {info['card_id']} attached to customer {customer_id}: {info['brand']} ****{info['last_four']}"
    if info["status"] == "usable":
        click.echo(f"{line} (usable)")
    else:
        click.echo(f"{line} (UNUSABLE: validation charge declined with {info['unusable_code']})")


@cards.command("list")
@click.option("--customer", "customer_id", type=ID, default=None, help="Only this customer's cards.")
@_limit_option
@json_option
@database_option
@handle_errors
def cards_list(customer_id: int | None, limit: int, as_json: bool, database_url: str | None) -> None:
    """List cards: brand, last four, expiry and status."""
    from sqlalchemy import func, select

    from billing.db.models import Card

    query = select(Card)
    count = select(func.count()).select_from(Card)
    if customer_id is not None:
        query = query.where(Card.customer_id == customer_id)
        count = count.where(Card.customer_id == customer_id)
    with session_scope(load_settings(database_url)) as session:
        total = session.execute(count).scalar_one()
        rows = session.execute(query.order_by(Card.id.desc()).limit(limit)).scalars().all()
    if as_json:
        echo_json(
            [
                {
                    "id": c.id,
                    "customer_id": c.customer_id,
                    "brand": c.brand,
                    "last_four": c.last_four,
                    "exp_month": c.exp_month,
                    "exp_year": c.exp_year,
                    "status": c.status,
                    "unusable_code": c.unusable_code,
                }
                for c in rows
            ]
        )
        return
    echo_table(
        ["id", "customer", "brand", "last four", "expires", "status"],
        [
            (
                c.id,
                c.customer_id,
                c.brand,
                c.last_four,
                f"{c.exp_month:02d}/{c.exp_year}" if c.exp_month and c.exp_year else None,
                c.status if c.unusable_code is None else f"{c.status} ({c.unusable_code})",
            )
            for c in rows
        ],
        empty="no cards",
    )
    _shown(total, len(rows))


# --- subscriptions ---------------------------------------------------------------------------------------


@click.group()
def subscriptions() -> None:
    """Subscriptions: a customer on a plan, charged every period."""


@subscriptions.command("create")
@click.option("--customer", "customer_id", required=True, type=ID, help="Customer id.")
@click.option("--plan", "plan_id", required=True, type=ID, help="Plan id.")
@click.option("--card", "card_id", type=ID, default=None, help="Card id [default: the customer's newest usable].")
@click.option("--trial-days", type=int, default=None, help="Override the plan's trial days.")
@json_option
@database_option
@handle_errors
def subscriptions_create(
    customer_id: int,
    plan_id: int,
    card_id: int | None,
    trial_days: int | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Subscribe a customer to a plan; the first charge is due now (or when the trial ends)."""
    from billing.db.models import Subscription
    from billing.services import catalog

    with open_context(load_settings(database_url)) as ctx:
        sub_id = catalog.subscribe(
            ctx, customer_id=customer_id, plan_id=plan_id, card_id=card_id, trial_days=trial_days
        )
        with ctx.sessions() as session:
            sub = session.get(Subscription, sub_id)
            assert sub is not None
            info = {"subscription_id": sub.id, "status": sub.status, "next_billing_at": sub.next_billing_at}
    if as_json:
        echo_json(info)
    else:
        click.echo(
            f"subscription {sub_id} created ({info['status']}); first charge due {format_time(info['next_billing_at'])}"
        )


@subscriptions.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in SubscriptionStatus]),
    help="Only these statuses (repeatable).",
)
@click.option("--customer", "customer_id", type=ID, default=None, help="Only this customer's subscriptions.")
@_limit_option
@json_option
@database_option
@handle_errors
def subscriptions_list(
    statuses: tuple[str, ...], customer_id: int | None, limit: int, as_json: bool, database_url: str | None
) -> None:
    """List subscriptions."""
    from sqlalchemy import ColumnElement, func, select

    from billing.db.models import Plan, Subscription

    filters: list[ColumnElement[bool]] = []
    if statuses:
        filters.append(Subscription.status.in_(statuses))
    if customer_id is not None:
        filters.append(Subscription.customer_id == customer_id)
    with session_scope(load_settings(database_url)) as session:
        total = session.execute(select(func.count()).select_from(Subscription).where(*filters)).scalar_one()
        rows = session.execute(
            select(Subscription, Plan.code)
            .join(Plan, Plan.id == Subscription.plan_id)
            .where(*filters)
            .order_by(Subscription.id.desc())
            .limit(limit)
        ).all()
    if as_json:
        echo_json(
            [
                {
                    "id": s.id,
                    "customer_id": s.customer_id,
                    "plan_id": s.plan_id,
                    "plan": code,
                    "card_id": s.card_id,
                    "status": s.status,
                    "next_billing_at": s.next_billing_at,
                    "current_period_end": s.current_period_end,
                    "cancel_at": s.cancel_at,
                }
                for s, code in rows
            ]
        )
        return
    echo_table(
        ["id", "customer", "plan", "card", "status", "next billing", "cancel at"],
        [
            (
                s.id,
                s.customer_id,
                code,
                s.card_id,
                s.status,
                format_time(s.next_billing_at),
                format_time(s.cancel_at) if s.cancel_at else None,
            )
            for s, code in rows
        ],
        empty="no subscriptions",
    )
    _shown(total, len(rows))


@subscriptions.command("cancel")
@click.argument("subscription_id", type=ID)
@click.option("--at-period-end", is_flag=True, help="Keep it until the current period ends.")
@click.option(
    "--refund-last-charge", is_flag=True, help="Also void the last paid charge (only inside the void window)."
)
@json_option
@database_option
@handle_errors
def subscriptions_cancel(
    subscription_id: int, at_period_end: bool, refund_last_charge: bool, as_json: bool, database_url: str | None
) -> None:
    """Cancel a subscription now, or at the end of its period."""
    from billing.services.subscriptions import cancel_subscription

    with open_context(load_settings(database_url)) as ctx:
        result = cancel_subscription(
            ctx,
            subscription_id=subscription_id,
            at_period_end=at_period_end,
            refund_last_charge=refund_last_charge,
        )
    if as_json:
        echo_json(result)
        return
    if not result["changed"]:
        click.echo(f"subscription {subscription_id} was already canceled")
    elif "cancel_at" in result:
        click.echo(f"subscription {subscription_id} will be canceled at {result['cancel_at']}")
    elif at_period_end:
        click.echo(f"subscription {subscription_id} canceled now: it no longer renews, so it has no period to finish")
    else:
        click.echo(f"subscription {subscription_id} canceled")
    if refund_last_charge:
        refund = result.get("refund")
        if refund is None:
            click.echo("no paid invoice to refund")
        else:
            click.echo(
                f"refund {refund['refund_id']}: {refund['state']}"
                + (" (runs on the next `billing tick` or worker run)" if refund["state"] == "requested" else "")
            )
