"""Scenario 8, the review procedure: an operator works the review queue exactly as docs/operations.md §8 says,
after a worker was SIGKILLed while calls queued at a low rate limit shared by two workers.

The case that used to charge twice (issue 11, defect 1): calls waiting at the rate limiter past their lease
were flagged for review although nothing had left; the operator rightly found no charge at Tpaga and resolved
them `--not-charged`; the retry charged, and then the queued first request left too. Now a call waits for the
limiter no longer than its deadline (then it is `not_sent`), so only a dead worker's attempts reach review,
and whatever the operator decides from Tpaga's records, the ledger ends with one approval per invoice.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, text

from billing.db.models import ChargeAttempt, Invoice
from tests.reliability.harness import Phases, World, outcomes, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

# Shared by both workers through Redis. A backlog deeper than the lease at this rate (BACKLOG calls at 3/s
# take 24 s) is issue 11's defect 1: a call queued past its lease was flagged for review although it had not
# left, and left later. Now a call waits at most 14 s for its slot, then it is `not_sent` (retried 60 s later):
# the first pass charges about 42, the retries the rest, within two passes.
RATE_LIMIT = {"TPAGA_RATE_LIMIT": "3", "TPAGA_RATE_LIMIT_MAX_WAIT": "14"}
BACKLOG = 56  # subscriptions; with those two or three periods behind, about 72 invoices
# Both at least the call budget (billing.config refuses less: 14 s + connect, retries and read), and different,
# so that an attempt's lease (lease_expires_at - sent_at) says which worker marked it `sending`.
LEASES = {"w1": 20, "w2": 21}
# One charge in four of the crash case answers after 4 s, beyond the 2 s read timeout: Tpaga has charged it
# and the answer is not back yet, the moment the kill must hit.
FAULTS: dict[str, Any] = {"latencyMs": 50, "nextCharges": (["ok"] * 3 + ["slow"]) * 4, "slowSeconds": 4}
ORDER = re.compile(r"^inv(\d+)-a\d+$")
LIMITER_NOT_SENT = ("DeadlineExceededError", "HeldBack")  # the limiter's deadline, before or inside the client


def test_the_operators_review_procedure_after_a_crash_at_the_rate_limit_leaves_one_charge_per_invoice(
    make_world: Any,
) -> None:
    figures: dict[str, Any] = {"runs": 1, "rate_limit_per_second": 3, "rate_limit_max_wait_seconds": 14}
    phase = Phases(figures)
    with timed(figures):
        # Given a backlog of due subscriptions (a fifth of them two or three periods behind), all on cards that
        # approve, and two workers and a beat sharing 3 charges a second; together they hold every invoice's
        # call at once (2 workers x 4 threads x batches of 10), so the calls queue at the limiter
        with phase("seed"):
            world = make_world("8. review procedure")
            # The beat and the CLI take the shorter lease; each worker its own (see LEASES).
            world.env_defaults.update(
                RATE_LIMIT, BILLING_CHARGE_BATCH_SIZE="10", BILLING_SENDING_LEASE_SECONDS=str(min(LEASES.values()))
            )
            world.seed(approve=scaled(BACKLOG))
            world.faults(latencyMs=50)
        with phase("start"):
            workers = {name: start(world, name) for name in LEASES}
            for proc in workers.values():
                proc.wait_for_log(r"ready\.", 60)
            world.start_beat()

        # When the backlog's first pass is over (charged, or not sent past the limiter's deadline)
        with phase("backlog at the limiter"):
            world.wait_for("select count(*) >= :n from charge_attempts", "the backlog claimed", 30, n=scaled(BACKLOG))
            wait_until_nothing_in_flight(world, 60)
        figures["backlog_first_pass"] = attempt_states(world)

        # And, while the not-sent ones wait for their retry, new subscriptions come due and a worker is
        # SIGKILLed while one of its charges is made at Tpaga and unanswered and another waits for its slot
        with phase("kill"):
            mine: dict[int, str] = {}
            # A loaded machine may settle a chosen attempt between the look and the kill: then try again
            # with new subscriptions (every kill counts in the proof's snapshot of what was `sending`).
            for _ in range(3):
                world.faults(**FAULTS)
                world.seed(approve=scaled(12), backdated_share=0)
                victim = wait_for_the_worst_moment(world, timeout_seconds=60)
                killed = world.kill(workers[victim])
                world.faults(nextCharges=[])  # the slow answers were for the kill: the retries must find none
                workers[victim] = start(world, victim)
                at_tpaga = ledger_orders(world)
                mine = victims_attempts(world, killed, LEASES[victim])
                if {order in at_tpaga for order in mine.values()} == {True, False}:
                    break
            else:
                raise AssertionError(f"no kill left one attempt charged at Tpaga and one not sent: {mine}")
            figures["killed_sending"] = len(mine)
            figures["killed_sending_charged_at_tpaga"] = sum(1 for order in mine.values() if order in at_tpaga)

        # And billing goes on until nothing is pending or sending: the review queue holds the ambiguous ones
        with phase("until nothing in flight"):
            wait_until_nothing_in_flight(world, 60)
            with world.ctx.sessions() as s:
                states = dict(
                    s.execute(select(ChargeAttempt.id, ChargeAttempt.state).where(ChargeAttempt.id.in_(mine))).all()
                )
            assert set(states.values()) == {"unknown"}, states

        # Then the operator runs the documented procedure through the real CLI: list everything, look each
        # orderId up in Tpaga's records (the emulator's ledger stands for the merchant dashboard), resolve
        with phase("review procedure"):
            items = review_list(world)
            assert items, "the kill should have left attempts in review"
            # Items are independent: three operators work the queue at once, as a team would on a long one.
            with ThreadPoolExecutor(3) as operators:
                decided = Counter(operators.map(lambda item: work_item(world, item), items))
            figures["review_procedure"] = {"reviewed": len(items), **dict(sorted(decided.items()))}
            assert decided["charged"] >= 1, decided  # the charge the kill caught at Tpaga
            assert decided["not_charged"] >= 1, decided  # the killed wave's calls still queued at the limiter

        # And after billing has gone on (the sweep charges what was not charged, the limiter's not_sent retries
        # come due), every invoice is paid once, the queue is empty and the ledger has one approval each
        with phase("billing goes on"):
            world.wait_for("select count(*) = 0 from invoices where state <> 'paid'", "every invoice paid", 120)
            assert world.wait_settled(30), world.counts()
        assert review_list(world) == []
        approvals = approvals_by_invoice(world)
        with world.ctx.sessions() as s:
            invoice_ids = set(s.execute(select(Invoice.id)).scalars())
            not_sent = dict(
                s.execute(
                    select(ChargeAttempt.error_message, func.count())
                    .where(ChargeAttempt.state == "not_sent")
                    .group_by(ChargeAttempt.error_message)
                ).all()
            )
        assert {i: approvals.get(i, 0) for i in invoice_ids} == dict.fromkeys(invoice_ids, 1)
        figures["not_sent"] = dict(sorted(not_sent.items()))
        figures["not_sent_limiter_deadline"] = sum(n for cause, n in not_sent.items() if cause in LIMITER_NOT_SENT)
        figures["charge_outcomes"] = dict(sorted(outcomes(world.logs()).items()))
        for proc in workers.values():
            proc.stop()
    prove(world, figures)


def start(world: World, name: str) -> Any:
    return world.start_worker(name, 4, BILLING_SENDING_LEASE_SECONDS=str(LEASES[name]))


def attempt_states(world: World) -> dict[str, int]:
    with world.ctx.sessions() as s:
        rows = s.execute(select(ChargeAttempt.state, func.count()).group_by(ChargeAttempt.state)).all()
    return {str(state): int(n) for state, n in sorted(rows)}


def ledger_orders(world: World) -> set[str]:
    return {str(c.get("orderId")) for c in world.ledger()["charges"]}


def sending(world: World) -> dict[int, tuple[str, float]]:
    """Attempts `sending`: id -> (orderId, the lease the worker that marked it took, in seconds)."""
    with world.ctx.sessions() as s:
        rows = s.execute(
            select(
                ChargeAttempt.id, ChargeAttempt.order_id, ChargeAttempt.sent_at, ChargeAttempt.lease_expires_at
            ).where(ChargeAttempt.state == "sending")
        ).all()
    return {i: (order, (lease - sent).total_seconds()) for i, order, sent, lease in rows if sent and lease}


def victims_attempts(world: World, killed: set[int], lease_seconds: int) -> dict[int, str]:
    """The attempts the killed worker left `sending` (world.kill's set also holds the other worker's)."""
    with world.ctx.sessions() as s:
        rows = s.execute(
            select(
                ChargeAttempt.id, ChargeAttempt.order_id, ChargeAttempt.sent_at, ChargeAttempt.lease_expires_at
            ).where(ChargeAttempt.id.in_(killed))
        ).all()
    return {
        i: order
        for i, order, sent, lease in rows
        if sent and lease and round((lease - sent).total_seconds()) == lease_seconds
    }


def wait_for_the_worst_moment(world: World, timeout_seconds: float) -> str:
    """A worker holding, at once, an attempt whose charge Tpaga has made and which is still unanswered 0.3 s
    later (a normal answer takes 50 ms: a slow one), and an attempt `sending` whose request has not reached
    Tpaga for 0.3 s (waiting at the rate limiter). Returns the worker's name."""
    by_lease = {lease: name for name, lease in LEASES.items()}
    first_seen: dict[tuple[int, bool], float] = {}
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        in_flight = sending(world)
        charged = ledger_orders(world)
        now = time.monotonic()
        held: dict[str, dict[bool, list[int]]] = {name: {True: [], False: []} for name in LEASES}
        for attempt_id, (order, lease) in in_flight.items():
            if round(lease) not in by_lease:
                continue
            key = (attempt_id, order in charged)
            if now - first_seen.setdefault(key, now) >= 0.3:
                held[by_lease[round(lease)]][order in charged].append(attempt_id)
        for name, kinds in held.items():
            if kinds[True] and kinds[False]:
                return name
        time.sleep(0.05)
    raise TimeoutError(f"no worker held a charge made and unanswered beside one not sent\n{world.logs()[-3000:]}")


def wait_until_nothing_in_flight(world: World, timeout_seconds: float) -> None:
    """No attempt `pending` or `sending`, twice in a row half a second apart."""
    query = text("select count(*) from charge_attempts where state in ('pending', 'sending')")
    deadline = time.monotonic() + timeout_seconds
    streak = 0
    while streak < 2:
        assert time.monotonic() < deadline, world.counts()
        with world.ctx.sessions() as s:
            streak = streak + 1 if s.execute(query).scalar_one() == 0 else 0
        time.sleep(0.5)


def review_list(world: World) -> list[dict[str, Any]]:
    """Step 1: `billing review list --json --all`; the count on stderr must match the list (the whole queue)."""
    done = world.cli("review", "list", "--json", "--all")
    assert done.returncode == 0, done.stderr
    items: list[dict[str, Any]] = json.loads(done.stdout)
    count = json.loads(done.stderr.strip().splitlines()[-1])
    assert count == {"total": len(items), "shown": len(items), "page": 1, "pages": 1}, count
    return items


def work_item(world: World, item: dict[str, Any]) -> str:
    """Steps 2 to 4 for one invoice; returns what was decided."""
    if item["tpaga_charge_id_known"]:
        return "left_to_the_lookup"  # step 1: those settle themselves
    response = requests.get(
        world.sandbox.base_url + "__sandbox/ledger", params={"orderId": item["order_id"]}, timeout=10
    )
    response.raise_for_status()
    paid = [c for c in response.json()["charges"] if c["paid"] and not c["voided"]]
    invoice = str(item["invoice_id"])
    if paid:
        done = world.cli("review", "resolve", invoice, "--charged", "--charge-id", str(paid[0]["id"]))
        expected, decided = f"invoice {invoice} resolved as charged: paid", "charged"
    else:
        done = world.cli("review", "resolve", invoice, "--not-charged")
        expected, decided = f"invoice {invoice} resolved as not charged", "not_charged"
    assert done.returncode == 0 and expected in done.stdout, (done.stdout, done.stderr)
    return decided


def approvals_by_invoice(world: World) -> Counter[int]:
    """Approved charges at Tpaga that are not voided, by invoice."""
    counts: Counter[int] = Counter()
    for charge in world.ledger()["charges"]:
        match = ORDER.match(str(charge.get("orderId") or ""))
        if match and charge["paid"] and not charge["voided"]:
            counts[int(match.group(1))] += 1
    return counts
