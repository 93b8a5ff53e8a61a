"""`billing seed`: bulk-create customers, cards and due subscriptions through the configured gateway.

Each customer is created at Tpaga (private key), a test card is tokenized (public key, as a browser would) and
associated (private key). The gateway calls run on a thread pool sharing one `TpagaClient` (it keeps an HTTP
session per thread); the rows are written in batches, so seeding thousands takes seconds, not minutes.
"""

from __future__ import annotations

import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import click

from billing.cli.common import database_option, echo_json, handle_errors, load_settings, open_context

SEED_PLAN_CODE = "seed-monthly"
BATCH_SIZE = 500

APPROVING_CARDS = ("4111111111111111", "4242424242424242", "5500000000000004", "378282246310005")


@dataclass(frozen=True)
class CardKind:
    """A family of test cards (tpaga-api.md section 5) and its share of a `mix` seed, in percent."""

    name: str
    numbers: tuple[str, ...]
    percent: int
    behaviour: str


# A realistic month of a subscription business: most cards approve, soft declines dominate the rest.
MIX: tuple[CardKind, ...] = (
    CardKind("approve", APPROVING_CARDS, 73, "approves (00)"),
    CardKind("51", ("4000000000510000",), 10, "declines 51 insufficient funds (soft)"),
    CardKind("05", ("4000000000050007",), 4, "declines 05 do not honor (soft)"),
    CardKind("61", ("4000000000610008",), 3, "declines 61 amount limit (soft)"),
    CardKind("hard", ("4000000000040008", "4000000000430001", "4000000000540007"), 3, "declines 04/43/54 (hard)"),
    CardKind("14", ("4000000000140006",), 2, "declines 14 invalid card (hard)"),
    CardKind("91/96", ("4000000000910002", "4000000000960007"), 2, "declines 91/96 issuer down (soft)"),
    CardKind("recovery", ("4000000000770000",), 2, "declines 51, 51, then approves"),
    CardKind("9999", ("4000000099990006",), 1, "9999 outcome unknown (review)"),
)
APPROVE_ONLY: tuple[CardKind, ...] = (CardKind("approve", APPROVING_CARDS, 100, "approves (00)"),)
assert sum(k.percent for k in MIX) == 100


def allocate(kinds: tuple[CardKind, ...], n: int, rng: random.Random) -> list[tuple[CardKind, str]]:
    """N (kind, card number) pairs in the kinds' shares (largest remainder), shuffled by `rng`."""
    exact = [n * k.percent / 100 for k in kinds]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(kinds)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    plan = [(kind, rng.choice(kind.numbers)) for kind, count in zip(kinds, counts, strict=True) for _ in range(count)]
    rng.shuffle(plan)
    return plan


@dataclass(frozen=True)
class _Seeded:
    index: int
    kind: str
    merchant_id: str
    email: str
    first_name: str
    last_name: str
    customer: Any  # gateway Customer
    card: Any  # gateway CreditCard


@dataclass(frozen=True)
class _Failed:
    index: int
    kind: str
    error: BaseException


def _seed_one(client: Any, index: int, kind: CardKind, number: str, run: str, exp_year: int) -> _Seeded | _Failed:
    """Create one customer and card at the gateway; never raises for a gateway failure."""
    from billing.gateway.errors import TpagaError

    merchant_id = f"seed-{run}-{index:07d}"
    email = f"seed+{run}-{index}@example.com"
    first, last = "Seed", f"Customer {index}"
    try:
        customer = client.create_customer(
            first_name=first, last_name=last, email=email, merchant_customer_id=merchant_id
        )
        token = client.tokenize_card(
            number=number, exp_month=12, exp_year=exp_year, holder_name=f"{first} {last}", cvc="123"
        )
        card = client.associate_card(customer.id, token)
    except (TpagaError, ValueError) as exc:
        return _Failed(index, kind.name, exc)
    return _Seeded(index, kind.name, merchant_id, email, first, last, customer, card)


def _ensure_plan(ctx: Any, amount: Any) -> tuple[int, Any]:
    """The `seed-monthly` plan's id and price, created on first use."""
    from sqlalchemy import select

    from billing.db.models import Plan
    from billing.domain.money import Money
    from billing.services import catalog
    from billing.services.errors import InvalidRequest

    def existing() -> tuple[int, Money] | None:
        with ctx.sessions() as session:
            plan = session.execute(select(Plan).where(Plan.code == SEED_PLAN_CODE)).scalar_one_or_none()
            return None if plan is None else (plan.id, Money(plan.amount_minor, plan.currency))

    found = existing()
    if found is not None:
        return found
    try:
        plan_id = catalog.create_plan(
            ctx, code=SEED_PLAN_CODE, name="Seed monthly", amount=amount, interval="month", interval_count=1
        )
    except InvalidRequest:  # another seed created it between our look and our insert
        found = existing()
        if found is None:
            raise
        return found
    return plan_id, amount


def _write_batch(ctx: Any, plan: Any, seeded: list[_Seeded]) -> int:
    """Insert the customers, cards and subscriptions of one batch in one transaction; returns subscriptions.

    The subscription rows are what `catalog.subscribe` writes for a plan without a trial: active, anchored now,
    first period due at once.
    """
    from billing.db.models import Card, Customer, Subscription
    from billing.domain.periods import Interval, period_boundary
    from billing.domain.states import CardStatus, SubscriptionStatus
    from billing.services import events

    if not seeded:
        return 0
    now = ctx.clock.now()
    created = 0
    with ctx.unit_of_work() as session:
        customers = [
            Customer(
                tpaga_customer_id=s.customer.id,
                merchant_customer_id=s.merchant_id,
                email=s.email,
                first_name=s.first_name,
                last_name=s.last_name,
                created_at=now,
            )
            for s in seeded
        ]
        session.add_all(customers)
        session.flush()
        cards = []
        for s, customer in zip(seeded, customers, strict=True):
            usable = s.card.validation_successful is not False
            cards.append(
                Card(
                    customer_id=customer.id,
                    tpaga_card_id=s.card.id,
                    brand=s.card.brand,
                    last_four=s.card.last_four,
                    exp_month=s.card.expiration_month,
                    exp_year=s.card.expiration_year,
                    status=CardStatus.USABLE if usable else CardStatus.UNUSABLE,
                    unusable_code=None if usable else s.card.validation_error_code,
                    created_at=now,
                )
            )
        session.add_all(cards)
        session.flush()
        first_due = period_boundary(now, 0, Interval(plan.interval), plan.interval_count, ctx.timezone)
        subs = [
            Subscription(
                customer_id=card.customer_id,
                plan_id=plan.id,
                card_id=card.id,
                status=SubscriptionStatus.ACTIVE,
                anchor_at=now,
                next_period_index=0,
                next_billing_at=first_due,
                created_at=now,
                updated_at=now,
            )
            for card in cards
            if card.status == CardStatus.USABLE
        ]
        session.add_all(subs)
        session.flush()
        for card in cards:
            events.record(session, now, "card.attached", card_id=card.id, usable=card.status == CardStatus.USABLE)
        for sub in subs:
            events.record(session, now, "subscription.created", subscription_id=sub.id, plan=plan.code, seed=True)
        created = len(subs)
    return created


def _run_pool(work: Callable[[int], _Seeded | _Failed], indexes: range, threads: int) -> Iterator[_Seeded | _Failed]:
    """Results as they complete, with at most a few batches' worth of calls queued at once."""
    window = max(threads * 4, 16)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="seed") as pool:
        it = iter(indexes)
        pending: set[Future[_Seeded | _Failed]] = set()

        def fill() -> None:
            while len(pending) < window:
                try:
                    index = next(it)
                except StopIteration:
                    return
                pending.add(pool.submit(work, index))

        fill()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
            fill()


def _describe_failure(exc: BaseException) -> str:
    from billing.cli.common import explain

    return f"{type(exc).__name__}: {explain(exc) or exc}"


@click.command()
@click.option("--subscriptions", "count", required=True, type=click.IntRange(1, 1_000_000), help="How many to create.")
@click.option(
    "--cards",
    "card_mix",
    type=click.Choice(["approve", "mix"]),
    default="mix",
    show_default=True,
    help="approve: only approving test cards; mix: ~73% approve, the rest declines, a recovery and a 9999.",
)
@click.option("--plan-amount", default="45000", show_default=True, help="Monthly COP price of the seed plan.")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1, 256), help="Gateway calls in flight.")
@click.option("--seed", "rng_seed", type=int, default=None, help="Random seed: the same seed, the same cards.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@database_option
@handle_errors
def seed(
    count: int,
    card_mix: str,
    plan_amount: str,
    threads: int,
    rng_seed: int | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Create N customers with test cards at the gateway and subscribe them, first charge due now.

    Uses TPAGA_API_URL, TPAGA_PRIVATE_KEY and TPAGA_PUBLIC_KEY (point them at `billing sandbox`). Run
    `billing tick` (or the workers) afterwards to charge them.
    """
    from billing.config import ConfigError
    from billing.db.models import Plan
    from billing.gateway import TpagaClient
    from billing.gateway.errors import NotSentError, UnauthorizedError
    from billing.services import catalog

    settings = load_settings(database_url)
    if not settings.tpaga_private_key:
        raise ConfigError("TPAGA_PRIVATE_KEY is not set (seeding creates customers at the gateway)")
    if not settings.tpaga_public_key:
        raise ConfigError("TPAGA_PUBLIC_KEY is not set (seeding tokenizes test cards with it)")
    amount = catalog.money_from_input(plan_amount, "COP")
    if rng_seed is None:
        rng_seed = secrets.randbelow(2**31)
    kinds = APPROVE_ONLY if card_mix == "approve" else MIX
    assignments = allocate(kinds, count, random.Random(rng_seed))
    run = secrets.token_hex(4)
    client = TpagaClient.from_settings(settings)
    started = time.perf_counter()
    with open_context(settings, gateway=client) as ctx:
        try:
            plan_id, plan_price = _ensure_plan(ctx, amount)
            if plan_price != amount:
                click.echo(
                    f"note: reusing plan {SEED_PLAN_CODE!r} at {plan_price.major} {plan_price.currency}, "
                    f"not --plan-amount {amount.major}",
                    err=True,
                )
            with ctx.sessions() as session:
                plan = session.get(Plan, plan_id)
            exp_year = ctx.clock.now().year + 5

            def work(index: int) -> _Seeded | _Failed:
                kind, number = assignments[index]
                return _seed_one(client, index, kind, number, run, exp_year)

            # One call first: a wrong key or an unreachable gateway fails once, clearly, not N times.
            first = work(0)
            if isinstance(first, _Failed) and isinstance(first.error, UnauthorizedError | NotSentError):
                raise first.error
            seeded: list[_Seeded] = []
            failures: list[_Failed] = []
            created = Counter[str]()
            subscribed = 0

            def take(result: _Seeded | _Failed) -> None:
                if isinstance(result, _Failed):
                    failures.append(result)
                else:
                    seeded.append(result)
                    created[result.kind] += 1

            take(first)
            with click.progressbar(length=count, label="seeding", file=sys.stderr) as bar:
                bar.update(1)
                for result in _run_pool(work, range(1, count), threads):
                    take(result)
                    bar.update(1)
                    if len(seeded) >= BATCH_SIZE:
                        subscribed += _write_batch(ctx, plan, seeded)
                        seeded.clear()
                subscribed += _write_batch(ctx, plan, seeded)
                seeded.clear()
        finally:
            client.close()
    elapsed = time.perf_counter() - started
    summary = _summary(kinds, created, failures, subscribed, count, elapsed, rng_seed, plan_id, card_mix)
    if as_json:
        echo_json(summary)
    else:
        _print_summary(kinds, summary)
    if failures:
        raise click.ClickException(f"{len(failures)} of {count} customers could not be seeded (see above)")


def _summary(
    kinds: tuple[CardKind, ...],
    created: Counter[str],
    failures: list[_Failed],
    subscribed: int,
    count: int,
    elapsed: float,
    rng_seed: int,
    plan_id: int,
    card_mix: str,
) -> dict[str, Any]:
    failed_by_kind = Counter(f.kind for f in failures)
    reasons = Counter(_describe_failure(f.error) for f in failures)
    return {
        "requested": count,
        "customers": sum(created.values()),
        "subscriptions": subscribed,
        "failed": len(failures),
        "failures": dict(reasons.most_common(10)),
        "by_card_kind": {
            k.name: {"created": created.get(k.name, 0), "failed": failed_by_kind.get(k.name, 0)} for k in kinds
        },
        "plan_id": plan_id,
        "cards": card_mix,
        "seed": rng_seed,
        "elapsed_seconds": round(elapsed, 3),
        "per_second": round(sum(created.values()) / elapsed, 1) if elapsed > 0 else None,
    }


def _print_summary(kinds: tuple[CardKind, ...], summary: dict[str, Any]) -> None:
    click.echo(
        f"seeded {summary['customers']} customers and {summary['subscriptions']} subscriptions "
        f"on plan {summary['plan_id']} ({SEED_PLAN_CODE}) in {summary['elapsed_seconds']:.2f}s "
        f"({summary['per_second']}/s; --seed {summary['seed']})"
    )
    click.echo(f"  {'card kind':<10} {'count':>7}  behaviour")
    for kind in kinds:
        row = summary["by_card_kind"][kind.name]
        failed = f"  ({row['failed']} failed)" if row["failed"] else ""
        click.echo(f"  {kind.name:<10} {row['created']:>7}  {kind.behaviour}{failed}")
    for reason, n in summary["failures"].items():
        click.echo(f"  failed x{n}: {reason}", err=True)
    if summary["subscriptions"]:
        click.echo("first charges are due now: run `billing tick` (or start the workers)")
