"""`billing plans|customers|cards|subscriptions`: the catalog, from the command line.

The commands that create or change customers and subscriptions take the same external ids as the tasks other
apps send (`--external-id`, `--customer-external-id`; docs/tasks.md), and those given one run the same command
services, so their outcomes are in the `commands` ledger too. A command naming an external id that does not
exist is refused at once (a worker waits for it: its creating message may still be on the way; an operator at
a prompt is not).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from billing.cli.common import (
    ID,
    actor_options,
    database_option,
    echo_json,
    echo_table,
    format_money,
    format_time,
    handle_errors,
    json_option,
    load_settings,
    make_actor,
    open_context,
    parse_when,
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


@contextmanager
def _at_once() -> Iterator[None]:
    """Refuse, now, a command that a worker would retry (an object not there yet, or being created at Tpaga by
    another process); the refusal is recorded in the ledger as the worker records its own when it gives up."""
    from billing.services.errors import Missing, Waiting

    try:
        yield
    except Missing as exc:
        reason = f"{exc.kind} {exc.external_id!r} does not exist"
        if exc.give_up is not None:
            exc.give_up(reason)
        raise click.ClickException(reason) from None
    except Waiting as exc:
        reason = f"{exc}; nothing was changed: try again in a moment"
        if exc.give_up is not None:
            exc.give_up(reason)
        raise click.ClickException(reason) from None


def _audit(actor: Any, action: str, **data: Any) -> Any:
    """The hook that records the operator with a change, in its transaction (a cancel's `record`, a command's
    `Meta.on_applied`); a call that changed nothing records nothing."""

    def record(session: Any, now: Any, result: dict[str, Any]) -> None:
        if result.get("changed"):
            if action == "subscription.cancel":
                data["at_period_end"] = "cancel_at" in result
            actor.record(session, now, action, subscription_id=result.get("subscription_id"), **data)

    return record


def _one_of(first: str, a: object, second: str, b: object) -> None:
    if (a is None) == (b is None):
        raise click.UsageError(f"give exactly one of {first} or {second}")


def _customer_by_external_id(session: Any, external_id: str) -> Any:
    from sqlalchemy import select

    from billing.db.models import Customer
    from billing.services.errors import NotFound
    from billing.services.ledger import check_external_id

    check_external_id("--customer-external-id", external_id)
    customer = session.execute(
        select(Customer).where(Customer.merchant_customer_id == external_id)
    ).scalar_one_or_none()
    if customer is None:
        raise NotFound(f"customer {external_id!r} does not exist")
    return customer


def _subscription_external_id(session: Any, subscription_id: int) -> str:
    """The external id of subscription `subscription_id` (pause and resume name subscriptions by it)."""
    from billing.db.models import Subscription
    from billing.services.errors import InvalidRequest, NotFound

    sub = session.get(Subscription, subscription_id)
    if sub is None:
        raise NotFound(f"subscription {subscription_id} does not exist")
    if sub.external_id is None:
        raise InvalidRequest(
            f"subscription {subscription_id} has no external id (it was created without --external-id); "
            "pause and resume name a subscription by its external id"
        )
    return str(sub.external_id)


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
@click.option(
    "--tax",
    default="excluded",
    show_default=True,
    help="Tax treatment of the (tax-inclusive) price: iva, inc, excluded or exempt.",
)
@click.option("--tax-rate", default=None, type=int, help="Tax percent: iva 19 (default) or 5; inc 8.")
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
    tax: str,
    tax_rate: int | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Create a plan (as `billing.upsert_plan`: the same terms again change nothing; other terms update a plan
    no subscription uses yet and are refused for one in use: make a new code)."""
    from billing.services import catalog, commands

    money = catalog.money_from_input(amount, currency)
    # Checked here too (the command checks again) so that bad input fails before the database is opened.
    plan_tax = catalog.tax_from_input(tax, tax_rate)
    with open_context(load_settings(database_url)) as ctx:
        result = commands.upsert_plan(
            ctx,
            code=code,
            name=name,
            amount=amount,
            currency=currency,
            interval=interval,
            interval_count=interval_count,
            trial_days=trial_days,
            tax=tax,
            tax_rate=tax_rate,
        )
    if as_json:
        echo_json(
            {
                "plan_id": result["plan_id"],
                "code": code,
                "created": result["created"],
                "changed": result["changed"],
                "tax": plan_tax.treatment.value,
                "tax_rate": plan_tax.rate,
            }
        )
        return
    what = "created" if result["created"] else "updated" if result["changed"] else "unchanged (same terms)"
    click.echo(
        f"plan {result['plan_id']} {what}: {code}, {format_money(money.amount_minor, money.currency)} "
        f"every {interval_count} {interval}(s), tax {_tax_label(plan_tax.treatment, plan_tax.rate)}"
    )


def _tax_label(treatment: str, rate: int) -> str:
    return f"{treatment} {rate}%" if treatment in ("iva", "inc") else str(treatment)


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
                    "tax": p.tax_treatment.value,
                    "tax_rate": p.tax_rate,
                }
                for p in rows
            ]
        )
        return
    echo_table(
        ["id", "code", "name", "amount", "every", "trial days", "tax"],
        [
            (
                p.id,
                p.code,
                p.name,
                format_money(p.amount_minor, p.currency),
                f"{p.interval_count} {p.interval}",
                p.trial_days,
                _tax_label(p.tax_treatment, p.tax_rate),
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
@click.option("--first-name", default=None, help="Required with --external-id.")
@click.option("--last-name", default=None, help="Required with --external-id.")
@click.option("--phone", default=None, help="Only with --external-id.")
@click.option(
    "--external-id",
    default=None,
    help="Your app's id for the customer (as `billing.upsert_customer`): created once; again, its fields are updated.",
)
@click.option(
    "--merchant-id",
    default=None,
    help="The earlier form: your id for the customer; creating it again is a no-op. Prefer --external-id.",
)
@json_option
@database_option
@handle_errors
def customers_create(
    email: str,
    first_name: str | None,
    last_name: str | None,
    phone: str | None,
    external_id: str | None,
    merchant_id: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Create a customer at Tpaga and record it here."""
    from billing.services import catalog, commands

    if not email.strip():
        raise click.BadParameter("must not be empty", param_hint="--email")
    if external_id is not None and merchant_id is not None:
        raise click.UsageError("give --external-id or --merchant-id, not both (they are the same id)")
    if external_id is None and phone is not None:
        raise click.UsageError("--phone is kept only for a customer with --external-id")
    if external_id is not None and (first_name is None or last_name is None):
        raise click.UsageError("--first-name and --last-name are required with --external-id")
    with open_context(load_settings(database_url)) as ctx:
        if external_id is None:
            customer_id = catalog.create_customer(
                ctx, email=email, first_name=first_name, last_name=last_name, merchant_customer_id=merchant_id
            )
            result: dict[str, Any] = {"customer_id": customer_id}
        else:
            assert first_name is not None and last_name is not None
            with _at_once():
                result = commands.upsert_customer(
                    ctx, external_id=external_id, email=email, first_name=first_name, last_name=last_name, phone=phone
                )
    if as_json:
        echo_json(result)
    elif external_id is None:
        click.echo(f"customer {result['customer_id']} ready")
    else:
        what = "created" if result["created"] else "updated"
        click.echo(f"customer {result['customer_id']} ({external_id}) {what}")


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
                    "external_id": c.merchant_customer_id,
                    "merchant_customer_id": c.merchant_customer_id,  # the same id, by its earlier name
                    "tpaga_customer_id": c.tpaga_customer_id,
                    "created_at": c.created_at,
                }
                for c in rows
            ]
        )
        return
    echo_table(
        ["id", "email", "name", "external id", "tpaga customer", "created"],
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
@click.option("--customer", "customer_id", type=ID, default=None, help="Customer id (ours).")
@click.option("--customer-external-id", default=None, help="Or the customer by your app's external id.")
@click.option(
    "--token",
    required=True,
    metavar="TOKEN|-",
    help="The temporary token from tokenize; '-' reads it from stdin (keeps it out of shell history).",
)
@json_option
@database_option
@handle_errors
def cards_attach(
    customer_id: int | None, customer_external_id: str | None, token: str, as_json: bool, database_url: str | None
) -> None:
    """Associate a card with a customer from a temporary (single-use) token; the same token again answers with
    the first card."""
    from billing.db.models import Card
    from billing.services import commands

    _one_of("--customer", customer_id, "--customer-external-id", customer_external_id)
    temp_token = _read_token(token)
    settings = load_settings(database_url)
    with open_context(settings) as ctx:
        with _at_once():
            result = commands.attach_card_result(
                ctx, token=temp_token, customer_id=customer_id, external_customer_id=customer_external_id
            )
        with ctx.sessions() as session:
            card = session.get(Card, result["card_id"])
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
    customer = customer_id if customer_external_id is None else f"{info['customer_id']} ({customer_external_id})"
    line = f"card {info['card_id']} attached to customer {customer}: {info['brand']} ****{info['last_four']}"
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
@click.option("--customer", "customer_id", type=ID, default=None, help="Customer id.")
@click.option("--customer-external-id", default=None, help="Or the customer by your app's external id.")
@click.option("--plan", "plan_id", type=ID, default=None, help="Plan id.")
@click.option("--plan-code", default=None, help="Or the plan by its code.")
@click.option(
    "--external-id",
    default=None,
    help="Your app's id for the subscription (as `billing.create_subscription`: the same terms again return it; "
    "the customer need not have a card yet, its invoices wait for one).",
)
@click.option("--card", "card_id", type=ID, default=None, help="Card id [default: the customer's newest usable].")
@click.option("--trial-days", type=int, default=None, help="Override the plan's trial days.")
@click.option(
    "--anchor-at", default=None, help="When the first period starts (ISO 8601; a time without offset is UTC)."
)
@json_option
@database_option
@handle_errors
def subscriptions_create(
    customer_id: int | None,
    customer_external_id: str | None,
    plan_id: int | None,
    plan_code: str | None,
    external_id: str | None,
    card_id: int | None,
    trial_days: int | None,
    anchor_at: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Subscribe a customer to a plan; the first charge is due now (or when the trial ends, or at the anchor)."""
    from sqlalchemy import select

    from billing.db.models import Customer, Plan, Subscription
    from billing.services import catalog, commands
    from billing.services.errors import InvalidRequest, NotFound

    _one_of("--customer", customer_id, "--customer-external-id", customer_external_id)
    _one_of("--plan", plan_id, "--plan-code", plan_code)
    if external_id is not None and card_id is not None:
        raise click.UsageError("--card cannot be used with --external-id: the subscription takes the customer's card")
    anchor = parse_when(anchor_at, "--anchor-at")
    with open_context(load_settings(database_url)) as ctx:
        with ctx.sessions() as session:
            if customer_external_id is not None:
                customer = _customer_by_external_id(session, customer_external_id)
            else:
                customer = session.get(Customer, customer_id)
                if customer is None:
                    raise NotFound(f"customer {customer_id} does not exist")
            if plan_code is not None:
                plan = session.execute(select(Plan).where(Plan.code == plan_code)).scalar_one_or_none()
                if plan is None:
                    raise NotFound(f"plan {plan_code!r} does not exist")
            else:
                plan = session.get(Plan, plan_id)
                if plan is None:
                    raise NotFound(f"plan {plan_id} does not exist")
            customer_key, merchant_id, plan_key, code = customer.id, customer.merchant_customer_id, plan.id, plan.code
        changed = True
        if external_id is None:
            sub_id = catalog.subscribe(
                ctx,
                customer_id=customer_key,
                plan_id=plan_key,
                card_id=card_id,
                trial_days=trial_days,
                anchor_at=anchor,
            )
        else:
            if merchant_id is None:
                raise InvalidRequest(
                    f"customer {customer_key} has no external id; a subscription with --external-id needs a "
                    "customer created with one (billing customers create --external-id)"
                )
            with _at_once():
                result = commands.create_subscription(
                    ctx,
                    external_id=external_id,
                    external_customer_id=merchant_id,
                    plan_code=code,
                    trial_days=trial_days,
                    anchor_at=anchor,
                )
            sub_id, changed = result["subscription_id"], result["changed"]
        with ctx.sessions() as session:
            sub = session.get(Subscription, sub_id)
            assert sub is not None
            info = {
                "subscription_id": sub.id,
                "external_id": sub.external_id,
                "status": sub.status,
                "next_billing_at": sub.next_billing_at,
                "card_id": sub.card_id,
                "created": changed,
            }
    if as_json:
        echo_json(info)
        return
    name = f"subscription {sub_id}" + (f" ({external_id})" if external_id else "")
    if not changed:
        click.echo(f"{name} already exists with these terms ({info['status']})")
        return
    click.echo(f"{name} created ({info['status']}); first charge due {format_time(info['next_billing_at'])}")
    if info["card_id"] is None:
        click.echo("the customer has no usable card yet: its invoices wait for `billing cards attach`")


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
                    "external_id": s.external_id,
                    "customer_id": s.customer_id,
                    "plan_id": s.plan_id,
                    "plan": code,
                    "card_id": s.card_id,
                    "status": s.status,
                    "next_billing_at": s.next_billing_at,
                    "current_period_end": s.current_period_end,
                    "cancel_at": s.cancel_at,
                    "paused_at": s.paused_at,
                    "resumes_at": s.resumes_at,
                }
                for s, code in rows
            ]
        )
        return
    echo_table(
        ["id", "external id", "customer", "plan", "card", "status", "next billing", "cancel at"],
        [
            (
                s.id,
                s.external_id,
                s.customer_id,
                code,
                s.card_id,
                f"{s.status} (paused)" if s.paused_at else s.status,
                format_time(s.next_billing_at),
                format_time(s.cancel_at) if s.cancel_at else None,
            )
            for s, code in rows
        ],
        empty="no subscriptions",
    )
    _shown(total, len(rows))


def _subscription_name(subscription_id: int, external_id: str | None) -> str:
    return f"subscription {subscription_id}" + (f" ({external_id})" if external_id else "")


@subscriptions.command("cancel")
@click.argument("subscription_id", type=ID, required=False)
@click.option("--external-id", default=None, help="Or the subscription by your app's external id.")
@click.option("--at-period-end", is_flag=True, help="Keep it until the current period ends.")
@click.option(
    "--refund-last-charge", is_flag=True, help="Also void the last paid charge (only inside the void window)."
)
@actor_options
@json_option
@database_option
@handle_errors
def subscriptions_cancel(
    subscription_id: int | None,
    external_id: str | None,
    at_period_end: bool,
    refund_last_charge: bool,
    by: str | None,
    reason: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Cancel a subscription (SUBSCRIPTION_ID or --external-id) now, or at the end of its period."""
    from billing.services import commands
    from billing.services.ledger import Meta
    from billing.services.subscriptions import cancel_subscription

    _one_of("SUBSCRIPTION_ID", subscription_id, "--external-id", external_id)
    audit = _audit(make_actor(by, reason), "subscription.cancel", refund_last_charge=refund_last_charge)
    with open_context(load_settings(database_url)) as ctx:
        if external_id is None:
            assert subscription_id is not None
            result = cancel_subscription(
                ctx,
                subscription_id=subscription_id,
                at_period_end=at_period_end,
                refund_last_charge=refund_last_charge,
                record=audit,
            )
        else:
            with _at_once():
                result = commands.cancel_subscription(
                    ctx,
                    external_subscription_id=external_id,
                    at_period_end=at_period_end,
                    refund_last_charge=refund_last_charge,
                    meta=Meta(on_applied=audit),
                )
    if as_json:
        echo_json(result)
        return
    name = _subscription_name(result["subscription_id"], external_id)
    if not result["changed"]:
        click.echo(f"{name} was already canceled")
    elif "cancel_at" in result:
        click.echo(f"{name} will be canceled at {result['cancel_at']}")
    elif at_period_end:
        click.echo(f"{name} canceled now: it no longer renews, so it has no period to finish")
    else:
        click.echo(f"{name} canceled")
    if refund_last_charge:
        refund = result.get("refund")
        if refund is None:
            click.echo("no paid invoice to refund")
        else:
            click.echo(
                f"refund {refund['refund_id']}: {refund['state']}"
                + (" (runs on the next `billing tick` or worker run)" if refund["state"] == "requested" else "")
            )


def _external_id_of(ctx: Any, subscription_id: int | None, external_id: str | None) -> str:
    _one_of("SUBSCRIPTION_ID", subscription_id, "--external-id", external_id)
    if external_id is not None:
        return external_id
    assert subscription_id is not None
    with ctx.sessions() as session:
        return _subscription_external_id(session, subscription_id)


@subscriptions.command("pause")
@click.argument("subscription_id", type=ID, required=False)
@click.option("--external-id", default=None, help="Or the subscription by your app's external id.")
@click.option(
    "--resumes-at",
    default=None,
    help="Resume by itself then (ISO 8601; a time without offset is UTC) [default: never].",
)
@actor_options
@json_option
@database_option
@handle_errors
def subscriptions_pause(
    subscription_id: int | None,
    external_id: str | None,
    resumes_at: str | None,
    by: str | None,
    reason: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Pause a subscription (as `billing.pause_subscription`): no invoice is opened and nothing is charged until
    it is resumed."""
    from billing.services import commands
    from billing.services.ledger import Meta

    when = parse_when(resumes_at, "--resumes-at")
    audit = _audit(make_actor(by, reason), "subscription.pause", resumes_at=when.isoformat() if when else None)
    with open_context(load_settings(database_url)) as ctx:
        target = _external_id_of(ctx, subscription_id, external_id)
        with _at_once():
            result = commands.pause_subscription(
                ctx, external_subscription_id=target, resumes_at=when, meta=Meta(on_applied=audit)
            )
    if as_json:
        echo_json(result)
        return
    name = _subscription_name(result["subscription_id"], target)
    until = f"until {format_time(when)}" if when else "until `billing subscriptions resume`"
    click.echo(f"{name} paused {until}" if result["changed"] else f"{name} was already paused {until}")


@subscriptions.command("resume")
@click.argument("subscription_id", type=ID, required=False)
@click.option("--external-id", default=None, help="Or the subscription by your app's external id.")
@actor_options
@json_option
@database_option
@handle_errors
def subscriptions_resume(
    subscription_id: int | None,
    external_id: str | None,
    by: str | None,
    reason: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Resume a paused subscription (as `billing.resume_subscription`): its anchor is kept; the current period
    is billed if it became due, the periods skipped while paused never are."""
    from billing.services import commands
    from billing.services.ledger import Meta

    audit = _audit(make_actor(by, reason), "subscription.resume")
    with open_context(load_settings(database_url)) as ctx:
        target = _external_id_of(ctx, subscription_id, external_id)
        with _at_once():
            result = commands.resume_subscription(ctx, external_subscription_id=target, meta=Meta(on_applied=audit))
    if as_json:
        echo_json(result)
        return
    name = _subscription_name(result["subscription_id"], target)
    click.echo(f"{name} resumed ({result['status']})" if result["changed"] else f"{name} was not paused")
