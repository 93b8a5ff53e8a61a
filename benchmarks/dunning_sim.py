"""Simulate a year of insufficient-funds (51) declines and compare the two dunning policies.

A SIMULATION, NOT EVIDENCE: it shows what each policy does under the model below, nothing about real customers.

The model (every number is a parameter below):
- `--customers` invoices whose first charge declines 51, their first-failure times spread uniformly over the
  year 2027 (any day, 06:00-20:00 in Bogota): a merchant bills on the subscription's anniversary day.
- Each customer is paid on Colombia's paydays (billing.domain.paydays: the 15th and the last day of the month,
  moved back to the previous business day): `--semimonthly` of them on both paydays, `--monthly` of them on
  the month's last payday only, the rest never within the year (an empty account: nothing recovers them).
- Salary lands at a random time between 00:00 and `--arrival-hours` on the payday, and the charge can be
  paid from then for a random `--funds-days-min`..`--funds-days-max` days (the money is spent afterwards).
- A retry succeeds exactly when it falls while the funds are there. Issuer outages, other codes and new cards
  are left out: every retry of the simulation declines 51 again or is approved.
The policies are the product's own domain code (billing.domain.dunning.decide_after_decline) with their
defaults: fixed (retries 1, 3, 5, 7 days after the first failure) and colombia (paydays; 21-day window), and
the fixed schedule stretched to 21 days, to tell the calendar's effect from the longer window's.

    .venv/bin/python benchmarks/dunning_sim.py --seed 17 --customers 20000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from billing.domain.declines import DeclineClass
from billing.domain.dunning import Action, AnyDunningPolicy, ColombiaPolicy, DunningPolicy, decide_after_decline
from billing.domain.paydays import paydays

BOGOTA = ZoneInfo("America/Bogota")


@dataclass(frozen=True)
class Customer:
    first_failure: datetime
    funded: tuple[tuple[datetime, datetime], ...]  # when the charge can be paid: [start, end) intervals


@dataclass(frozen=True)
class Result:
    recovered_days: list[float]  # per recovered invoice: days from the first failure to the approval
    retries: int
    customers: int


def make_customers(rng: random.Random, args: argparse.Namespace) -> list[Customer]:
    year_start = datetime(2027, 1, 1, tzinfo=BOGOTA)
    months = [(y, m) for y in (2026, 2027, 2028) for m in range(1, 13)]
    all_paydays = [(p, i == 1) for y, m in months for i, p in enumerate(paydays(y, m))]  # (day, month's last)
    customers = []
    for _ in range(args.customers):
        day = rng.randrange(365)
        first = year_start + timedelta(days=day, hours=rng.uniform(6, 20))
        kind = rng.random()
        funded: list[tuple[datetime, datetime]] = []
        if kind < args.semimonthly + args.monthly:
            monthly_only = kind >= args.semimonthly
            for payday, is_last in all_paydays:
                if monthly_only and not is_last:
                    continue
                start = datetime(payday.year, payday.month, payday.day, tzinfo=BOGOTA)
                start += timedelta(hours=rng.uniform(0, args.arrival_hours))
                end = start + timedelta(days=rng.uniform(args.funds_days_min, args.funds_days_max))
                if start <= first < end:
                    continue  # the first charge was declined: the money was not there then
                if end > first - timedelta(days=1) and start < first + timedelta(days=90):
                    funded.append((start, end))
        customers.append(Customer(first, tuple(funded)))
    return customers


def has_funds(customer: Customer, at: datetime) -> bool:
    return any(start <= at < end for start, end in customer.funded)


def run(policy: AnyDunningPolicy, customers: list[Customer]) -> Result:
    recovered: list[float] = []
    retries = 0
    for customer in customers:
        first = customer.first_failure.astimezone(UTC)
        now, soft = first, 1
        while True:
            decision = decide_after_decline(
                policy,
                DeclineClass.SOFT,
                first_failure_at=first,
                soft_failures=soft,
                now=now,
                code="51",
                previous_code="51" if soft > 1 else None,
                card_declines=soft,
            )
            if decision.action is not Action.RETRY or decision.retry_at is None:
                break
            now = decision.retry_at
            retries += 1
            if has_funds(customer, now):
                recovered.append((now - first) / timedelta(days=1))
                break
            soft += 1
    return Result(recovered, retries, len(customers))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--semimonthly", type=float, default=0.65, help="share paid on both paydays")
    parser.add_argument("--monthly", type=float, default=0.25, help="share paid on the month's last payday")
    parser.add_argument("--arrival-hours", type=float, default=12.0, help="salary lands 00:00 to this hour")
    parser.add_argument("--funds-days-min", type=float, default=1.0)
    parser.add_argument("--funds-days-max", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.customers < 1 or not 0 <= args.semimonthly + args.monthly <= 1:
        parser.error("--customers must be >= 1 and --semimonthly + --monthly between 0 and 1")
    if not 0 < args.funds_days_min <= args.funds_days_max or not 0 <= args.arrival_hours <= 24:
        parser.error("need 0 < --funds-days-min <= --funds-days-max and --arrival-hours within 0-24")

    started = time.perf_counter()
    customers = make_customers(random.Random(args.seed), args)
    # The third row separates the calendar from the longer window: the fixed schedule stretched over 21 days.
    policies: list[tuple[str, AnyDunningPolicy]] = [
        ("fixed (1,3,5,7)", DunningPolicy()),
        ("fixed over 21 days (1,3,5,7,10,14,21)", DunningPolicy(retry_days=(1, 3, 5, 7, 10, 14, 21))),
        ("colombia", ColombiaPolicy()),
    ]
    print(
        f"dunning_sim: {args.customers} customers declining 51, seed {args.seed}, model: "
        f"{args.semimonthly:.0%} semi-monthly, {args.monthly:.0%} monthly, rest never paid; salary by "
        f"{args.arrival_hours:g}h, funds last {args.funds_days_min:g}-{args.funds_days_max:g} days"
    )
    print("| policy | recovered | days to recovery: median | p90 | max | retries per invoice |")
    print("|---|---|---|---|---|---|")
    for name, policy in policies:
        result = run(policy, customers)
        days = result.recovered_days
        rate = len(days) / result.customers
        median = statistics.median(days) if days else float("nan")
        print(
            f"| {name} | {rate:.1%} | {median:.1f} | {percentile(days, 0.9):.1f} | "
            f"{max(days, default=float('nan')):.1f} | {result.retries / result.customers:.2f} |"
        )
    print(f"({time.perf_counter() - started:.1f} s on this machine, Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
