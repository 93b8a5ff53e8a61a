"""The one proof every reliability scenario ends with (design.md section 2, invariants 1 to 3 and 5).

Read the database and the emulator's ledger (what Tpaga would have) and check:

1. every due subscription period has exactly one invoice (no renewal lost, none duplicated);
2. at the emulator, no orderId and no invoice has two approved charges that are not voided (no double
   charge), and money taken at Tpaga always belongs to an invoice that is paid with that very charge, or in
   review;
3. every invoice is paid, open under dunning (a retry scheduled after a decline, or waiting for a new card
   after a hard decline), uncollectible, or in review; no attempt is left `pending` or `sending`;
4. every review item is explained by a real ambiguous moment: a dropped, garbled or too-slow answer on that
   orderId (the ledger's `delivery`), a 5xx (no ledger charge, HTTP 5xx recorded), a 9999 answer, a worker
   SIGKILLed while the attempt was `sending`, or a read timeout the worker really hit (on a loaded host an
   answer the emulator sent on time can still reach the worker after its read timeout); and every such moment was flagged (x of x): its attempt
   is `unknown`, or was and has been settled from review since;
5. no secret (private key, Tpaga card id, temporary token) in the workers' logs or on the broker.

`prove` returns the figures and fails the test with every problem found, not just the first.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import select

from billing.db.models import Card, ChargeAttempt, Event, Invoice, Refund
from billing.domain.declines import DeclineClass, classify
from tests.reliability.harness import ARTIFACTS, FIGURES, SECRETS, World, received

ORDER = re.compile(r"^inv(\d+)-a(\d+)$")
AMBIGUOUS_DELIVERY = ("dropped", "garbage")
UNKNOWN_CODES = ("9999", "")


def secrets_found(texts: dict[str, str], secrets: set[str]) -> list[str]:
    """`label: secret…` for every secret that occurs in one of the texts."""
    return [f"{label}: {secret[:6]}…" for label, body in texts.items() for secret in secrets if secret in body]


def prove(
    world: World, figures: dict[str, Any], *, paused_allowed: bool = False, orphans: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Check the invariants (module docstring); record and return the figures; fail listing every problem.

    `orphans` are orderIds of charges a scenario made at Tpaga behind this system's back (no attempt here):
    each must be voided at Tpaga by now, and is otherwise left out of the checks."""
    problems: list[str] = []
    now = world.ctx.clock.now()
    expected = world.expected_periods(now)
    with world.ctx.sessions() as session:
        invoices = session.execute(select(Invoice)).scalars().all()
        attempts = session.execute(select(ChargeAttempt)).scalars().all()
        cards = {c.id: c for c in session.execute(select(Card)).scalars()}
        voided_refunds = set(session.execute(select(Refund.invoice_id).where(Refund.state == "voided")).scalars())
        # Attempts flagged unknown and later settled from review (by an operator or a lookup): flagged all the same.
        flagged_ever = set(session.execute(select(Event.attempt_id).where(Event.kind == "attempt.unknown")).scalars())
        settled_from_review = flagged_ever & set(
            session.execute(
                select(Event.attempt_id).where(Event.kind.in_(("attempt.resolved", "review.resolved")))
            ).scalars()
        )
    ledger = world.ledger()
    stats = world.stats()
    charges = ledger["charges"]

    # 1. exactly one invoice per due period
    periods: dict[int, list[int]] = defaultdict(list)
    for inv in invoices:
        periods[inv.subscription_id].append(inv.period_index)
    missing = duplicated = 0
    for sub_id, indexes in expected.items():
        got = Counter(periods.get(sub_id, []))
        missing += len(set(indexes) - set(got))
        duplicated += sum(n - 1 for n in got.values() if n > 1)
        extra = set(got) - set(indexes)
        if extra:
            problems.append(f"subscription {sub_id}: invoices for periods not yet due {sorted(extra)}")
    if missing:
        problems.append(f"{missing} due period(s) without an invoice (lost renewals)")
    if duplicated:
        problems.append(f"{duplicated} period(s) invoiced twice")

    # 2. the ledger: one approved, unvoided charge per orderId and per invoice, and only for paid/review
    by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
    approved_by_invoice: dict[int, list[str]] = defaultdict(list)
    voided_by_invoice: dict[int, list[str]] = defaultdict(list)  # approved, then refunded (voided)
    for charge in charges:
        order = charge.get("orderId") or ""
        if order in orphans:
            if charge["paid"] and not charge["voided"]:
                problems.append(f"{order}: a charge unknown here is still not voided at Tpaga")
            continue
        by_order[order].append(charge)
        match = ORDER.match(order)
        if match is None:
            problems.append(f"a ledger charge with a foreign orderId {order!r}")
            continue
        if charge["paid"] and not charge["voided"]:
            approved_by_invoice[int(match.group(1))].append(order)
        if charge["paid"] and charge["voided"]:
            voided_by_invoice[int(match.group(1))].append(order)
    twice_by_order = [o for o, cs in by_order.items() if sum(1 for c in cs if c["paid"] and not c["voided"]) > 1]
    double = {inv: orders for inv, orders in approved_by_invoice.items() if len(orders) > 1}
    if twice_by_order:
        problems.append(f"orderIds approved twice at Tpaga: {twice_by_order[:10]}")
    if double:
        problems.append(f"invoices charged twice at Tpaga: {dict(list(double.items())[:10])}")

    attempts_by_invoice: dict[int, list[ChargeAttempt]] = defaultdict(list)
    for att in attempts:
        attempts_by_invoice[att.invoice_id].append(att)
    states: Counter[str] = Counter()
    lost_open = 0
    for inv in invoices:
        mine = attempts_by_invoice.get(inv.id, [])
        approved = [a for a in mine if a.state == "approved"]
        at_tpaga = approved_by_invoice.get(inv.id, [])
        kind = inv.state
        if inv.state == "paid":
            refunded = voided_by_invoice.get(inv.id, [])
            if refunded and inv.id not in voided_refunds:
                problems.append(f"invoice {inv.id}: Tpaga voided {refunded} but no refund of ours says so")
            if len(approved) != 1 or at_tpaga + refunded != [approved[0].order_id]:
                problems.append(
                    f"invoice {inv.id} paid with {len(approved)} approved attempt(s) here and {at_tpaga} at Tpaga"
                )
        elif at_tpaga and inv.state != "review":
            problems.append(f"invoice {inv.id} is {inv.state} but Tpaga approved {at_tpaga}")
        if inv.state == "open":
            card_unusable = any(cards[a.card_id].status == "unusable" for a in mine if a.card_id in cards)
            declined_before = inv.soft_failures > 0 or inv.last_error_code is not None
            if inv.due_at is not None and inv.due_at > now and declined_before:
                kind = "open (dunning retry scheduled)"
            elif inv.due_at is None and card_unusable and classify(inv.last_error_code) == DeclineClass.HARD:
                kind = "open (waiting for a new card)"
            elif paused_allowed and inv.due_at is not None:
                kind = "open (billing paused)"
            else:
                kind = "open (LOST: nothing will charge it)"
                lost_open += 1
                problems.append(
                    f"invoice {inv.id} open with due_at {inv.due_at}, soft_failures {inv.soft_failures}, "
                    f"last code {inv.last_error_code}, attempts {[(a.order_id, a.state) for a in mine]}"
                )
        elif inv.state not in ("paid", "review", "uncollectible"):
            problems.append(f"invoice {inv.id} is {inv.state}")
        states[kind] += 1
    stuck = [a for a in attempts if a.state in ("pending", "sending")]
    if stuck:
        problems.append(f"{len(stuck)} attempt(s) left in flight: {[(a.order_id, a.state) for a in stuck[:10]]}")

    # 4. ambiguous moments (one per attempt, named by its first cause), and review items, explained both ways
    attempt_by_order = {a.order_id: a for a in attempts}
    for order in by_order:
        if order not in attempt_by_order:
            problems.append(f"{order}: charged at Tpaga with no attempt recorded here")
    # A 5xx makes no charge, so it is not in the ledger: the emulator counts them (no refunds run under
    # random faults in this suite, so every one answered a charge).
    server_errors = int(stats.get("faults", {}).get("5xx", 0))
    ambiguous: Counter[str] = Counter()
    flagged: Counter[str] = Counter()
    for att in attempts:
        at_tpaga = by_order.get(att.order_id, [])
        causes = []
        if att.unknown_reason == "lease_expired":
            causes.append("worker killed while sending")
            if att.id not in world.killed_while_sending:
                problems.append(f"{att.order_id}: lease expired but no worker was killed while it was sending")
        causes += [f"answer {c['delivery']}" for c in at_tpaga if c.get("delivery") in AMBIGUOUS_DELIVERY]
        causes += ["9999" for c in at_tpaga if c.get("errorCode") in UNKNOWN_CODES]
        if (att.http_status or 0) >= 500 and not at_tpaga:
            causes.append("5xx")
        if att.unknown_reason == "timeout" and at_tpaga:
            causes.append("read timeout")
        if not causes:
            continue
        ambiguous[causes[0]] += 1
        if att.state == "unknown" or att.id in settled_from_review:
            flagged[causes[0]] += 1
        else:
            problems.append(f"{att.order_id}: {causes} but the attempt is {att.state}")
    if sum(1 for a in attempts if (a.http_status or 0) >= 500 and a.order_id not in by_order) != server_errors:
        problems.append(f"the emulator answered {server_errors} charge(s) with a 5xx; the attempts do not agree")

    unexplained = 0
    for inv in invoices:
        if inv.state != "review":
            continue
        unknown = [a for a in attempts_by_invoice.get(inv.id, []) if a.state == "unknown"]
        if len(unknown) != 1:
            unexplained += 1
            problems.append(f"invoice {inv.id} in review with {len(unknown)} unknown attempt(s) ({inv.review_reason})")
            continue
        att = unknown[0]
        at_tpaga = by_order.get(att.order_id, [])
        reasons = [
            att.id in world.killed_while_sending,
            any(c.get("delivery") in AMBIGUOUS_DELIVERY for c in at_tpaga),
            any(c.get("errorCode") in UNKNOWN_CODES for c in at_tpaga),
            (att.http_status or 0) >= 500 and not at_tpaga and server_errors > 0,
            att.unknown_reason == "timeout" and bool(at_tpaga),
        ]
        if not any(reasons):
            unexplained += 1
            problems.append(
                f"invoice {inv.id} in review without an ambiguous moment: {att.order_id} {att.unknown_reason} "
                f"HTTP {att.http_status}, at Tpaga {[(c['paid'], c['delivery'], c['errorCode']) for c in at_tpaga]}"
            )

    # 5. secrets
    log = world.logs()
    broker = world.redis.dump()
    ARTIFACTS.append((f"{world.name}: broker at the end", broker))
    leaks = secrets_found({"worker logs": log, "broker": broker}, world_secrets(world))
    if leaks:
        problems.append(f"secrets found: {leaks[:10]}")

    deliveries = len(received(log))
    figures.update(
        {
            "subscriptions": len(expected),
            "due_periods": sum(len(v) for v in expected.values()),
            "invoices": len(invoices),
            "invoice_states": dict(sorted(states.items())),
            "attempts": len(attempts),
            "charges_at_tpaga": len(charges),
            "approved_at_tpaga": sum(len(v) for v in approved_by_invoice.values()),
            "double_charges": len(double) + len(twice_by_order),
            "lost_renewals": missing + lost_open + len(stuck),
            "ambiguous": {k: f"{flagged[k]} of {v}" for k, v in sorted(ambiguous.items()) if v},
            "ambiguous_flagged": f"{sum(flagged.values())} of {sum(ambiguous.values())}",
            "review": states.get("review", 0),
            "unexplained_reviews": unexplained,
            "kills": world.kills,
            "faults_at_tpaga": {k: v for k, v in stats.get("faults", {}).items() if v},
            "charge_messages_delivered": deliveries,
            "secrets_found": len(leaks),
        }
    )
    FIGURES[world.name] = figures
    assert not problems, f"{world.name}: {len(problems)} problem(s):\n" + "\n".join(problems[:60])
    return figures


def world_secrets(world: World) -> set[str]:
    """The private key, every Tpaga card id this world stored, and the temporary tokens it used."""
    with world.ctx.sessions() as session:
        card_ids = set(session.execute(select(Card.tpaga_card_id)).scalars())
    return card_ids | SECRETS
