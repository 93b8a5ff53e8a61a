"""Scenario 9, the review queue in bulk: a worker is SIGKILLed mid-wave, and the operator reconciles everything it
left in review at once (docs/operations.md §8): `billing review export`, Tpaga's transaction report downloaded
from the merchant dashboard (the emulator's /__sandbox/report.csv), `billing review import`.

Beside the wave, Tpaga holds a charge this database never made (an orphan: a restored database, say). After the
import the queue is empty, every settlement is what Tpaga's ledger says (charged: paid with that very charge;
not charged: Tpaga has no charge for the orderId), the orphan is voided, and billing goes on to one approval per
invoice. Importing the same report again changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from billing.db.models import ChargeAttempt, Event, Invoice, Refund
from billing.gateway.models import Charge
from tests.reliability.harness import SECRETS, Phases, World, outcomes, scaled, timed
from tests.reliability.proof import prove
from tests.reliability.test_8_review import (
    FAULTS,
    LEASES,
    RATE_LIMIT,
    approvals_by_invoice,
    ledger_orders,
    review_list,
    start,
    victims_attempts,
    wait_for_the_worst_moment,
    wait_until_nothing_in_flight,
)

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

WAVE = 24  # due subscriptions: at the shared 3/s they queue at the limiter for about 8 s, inside its 14 s
# The emulator and the database read this machine's one clock, so the import's allowance for two clocks
# (60 s by default) can be small; the wait before the download is then seconds, not a minute.
CLOCK_MARGIN_SECONDS = 3


def test_a_crashed_wave_is_reconciled_in_bulk_from_tpagas_report(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1, "wave": scaled(WAVE)}
    phase = Phases(figures)
    with timed(figures):
        # Given due subscriptions, two workers and a beat sharing 3 charges a second (calls wait at the limiter
        # while `sending`), and one charge in four answered after 4 s, beyond the 2 s read timeout
        with phase("seed"):
            world = make_world("10. review import")
            world.env_defaults.update(
                RATE_LIMIT, BILLING_CHARGE_BATCH_SIZE="10", BILLING_SENDING_LEASE_SECONDS=str(min(LEASES.values()))
            )
            started_at = sandbox_now(world) - timedelta(minutes=1)
        with phase("start"):
            workers = {name: start(world, name) for name in LEASES}
            for proc in workers.values():
                proc.wait_for_log(r"ready\.", 60)
            world.start_beat()

        # When a worker is SIGKILLed mid-wave, holding a charge Tpaga made and has not answered and a call still
        # waiting for its slot; and Tpaga holds a charge no attempt here made
        with phase("kill"):
            mine: dict[int, str] = {}
            # A loaded machine may settle a chosen attempt between the look and the kill: then a new wave.
            for _ in range(3):
                world.faults(**FAULTS)
                world.seed(approve=scaled(WAVE), backdated_share=0)
                victim = wait_for_the_worst_moment(world, timeout_seconds=60)
                killed = world.kill(workers[victim])
                world.faults(nextCharges=[])
                workers[victim] = start(world, victim)
                charged = ledger_orders(world)
                mine = victims_attempts(world, killed, LEASES[victim])
                if {order in charged for order in mine.values()} == {True, False}:
                    break
            else:
                raise AssertionError(f"no kill left one attempt charged at Tpaga and one not sent: {mine}")
            figures["killed_sending"] = len(mine)
            figures["killed_sending_charged_at_tpaga"] = sum(1 for o in mine.values() if o in charged)
            orphan = charge_behind_our_back(world)
        with phase("until nothing in flight"):
            wait_until_nothing_in_flight(world, 60)
            assert world.wait_settled(60), world.counts()

        # Then the operator exports the queue, downloads Tpaga's report for a range covering it, and imports it
        with phase("export"):
            queue = review_list(world)
            exported = export(world)
            assert [r["order_id"] for r in exported] == [q["order_id"] for q in queue]
            assert set(mine.values()) <= {r["order_id"] for r in exported}
            last_flagged = max(datetime.fromisoformat(r["flagged_at"]) for r in exported)
            wait_past(world, last_flagged + timedelta(seconds=CLOCK_MARGIN_SECONDS + 1))
        with phase("download"):
            until = sandbox_now(world)
            report = world.tmp / "transactions.csv"
            report.write_bytes(download(world, started_at, until))
        command = [
            "review",
            "import",
            str(report),
            "--from",
            started_at.isoformat(),
            "--to",
            until.isoformat(),
            "--clock-margin",
            f"{CLOCK_MARGIN_SECONDS}s",
        ]
        at_tpaga = paid_orders(world)
        with phase("import"):
            done = world.cli(*command, "--by", "ops-oncall", "--reason", "worker killed mid-wave", "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)

        # The queue is empty, and every settlement is what Tpaga's ledger says
        assert result["in_review"] == 0 and result["left_in_review"] == [], result
        assert review_list(world) == []
        assert [v["charge_id"] for v in result["orphans_voided"]] == [orphan.id]
        assert result["discrepancies"] == [], result["discrepancies"]
        settlements = imported(world)
        assert sorted(settlements) == sorted(r["order_id"] for r in exported)
        for order_id, (outcome, charge_id) in settlements.items():
            if order_id in at_tpaga:
                assert (outcome, charge_id) == ("approved", at_tpaga[order_id]), order_id
            else:
                assert outcome == "not_charged" and not world.ledger_of(order_id), order_id
        assert Counter(o for o, _ in settlements.values()) == Counter(result["settled"])
        assert result["settled"].get("approved", 0) >= 1 and result["settled"].get("not_charged", 0) >= 1
        orphan_now = world.ledger_of(orphan.order_id or "")
        assert [(c["paid"], c["voided"]) for c in orphan_now] == [(True, True)]
        figures["import"] = {
            "review_items": len(exported),
            "report_rows": result["rows"],
            **{f"settled_{k}": v for k, v in sorted(result["settled"].items())},
            "orphans_voided": len(result["orphans_voided"]),
        }

        # And billing goes on: what was not charged is charged once, every invoice holds one approval
        with phase("billing goes on"):
            world.wait_for("select count(*) = 0 from invoices where state <> 'paid'", "every invoice paid", 120)
            assert world.wait_settled(30), world.counts()
        with world.ctx.sessions() as s:
            invoice_ids = set(s.execute(select(Invoice.id)).scalars())
        approvals = approvals_by_invoice(world)
        assert {i: approvals.get(i, 0) for i in invoice_ids} == dict.fromkeys(invoice_ids, 1)

        # And importing the same report again changes nothing (with every process stopped, so that any change
        # would be the import's)
        for proc in world.procs:
            proc.stop()
        before = snapshot(world)
        again = world.cli(*command, "--json")
        assert again.returncode == 0, again.stderr
        second = json.loads(again.stdout)
        assert snapshot(world) == before
        assert (second["settled"], second["orphans_voided"], second["orphans_already_voided"]) == ({}, [], 1)
        figures["second_import"] = {"settled": 0, "orphans_already_voided": second["orphans_already_voided"]}
        figures["charge_outcomes"] = dict(sorted(outcomes(world.logs()).items()))
    prove(world, figures, orphans=frozenset({orphan.order_id or ""}))


def sandbox_now(world: World) -> datetime:
    response = requests.get(world.sandbox.base_url + "__sandbox/clock", timeout=10)
    return datetime.fromisoformat(response.json()["now"])


def charge_behind_our_back(world: World) -> Charge:
    """A charge at Tpaga with an orderId of this system's kind that no attempt here made."""
    with world.ctx.sessions() as s:
        top = s.execute(select(func.max(Invoice.id))).scalar_one() or 0
    _customer, card, token = world._remote_card("4111111111111111")
    SECRETS.update({card.id, token})
    return world.gateway.charge(card_id=card.id, amount=45000, currency="COP", order_id=f"inv{top + 1000}-a1")


def export(world: World) -> list[dict[str, str]]:
    done = world.cli("review", "export", "--csv")
    assert done.returncode == 0, done.stderr
    return list(csv.DictReader(io.StringIO(done.stdout)))


def wait_past(world: World, moment: datetime) -> None:
    """Until both clocks (one machine's) are past `moment`: the report must cover the last flagged request."""
    deadline = time.monotonic() + 30
    while sandbox_now(world) <= moment:
        assert time.monotonic() < deadline, f"the clock never passed {moment}"
        time.sleep(0.2)


def download(world: World, start: datetime, end: datetime) -> bytes:
    response = requests.get(
        world.sandbox.base_url + "__sandbox/report.csv",
        params={"from": start.isoformat(), "to": end.isoformat()},
        timeout=30,
    )
    response.raise_for_status()
    return response.content


def paid_orders(world: World) -> dict[str, str]:
    """orderId -> charge id of every charge Tpaga approved and did not void."""
    return {str(c["orderId"]): str(c["id"]) for c in world.ledger()["charges"] if c["paid"] and not c["voided"]}


def imported(world: World) -> dict[str, tuple[str, str | None]]:
    """What the import did to each attempt: orderId -> (outcome, the charge id it was settled with)."""
    with world.ctx.sessions() as s:
        rows = s.execute(
            select(Event.data, ChargeAttempt.order_id)
            .join(ChargeAttempt, ChargeAttempt.id == Event.attempt_id)
            .where(Event.kind == "operator.action")
        ).all()
    found = {}
    for data, order_id in rows:
        if data.get("action") == "review.import":
            assert (data["by"], data["reason"]) == ("ops-oncall", "worker killed mid-wave"), data
            found[order_id] = (str(data["outcome"]), data.get("charge_id"))
    return found


def snapshot(world: World) -> dict[str, Any]:
    with world.ctx.sessions() as s:
        return {
            "events": s.execute(select(func.count()).select_from(Event)).scalar_one(),
            "attempts": dict(s.execute(select(ChargeAttempt.id, ChargeAttempt.state)).all()),
            "invoices": dict(s.execute(select(Invoice.id, Invoice.state)).all()),
            "refunds": dict(s.execute(select(Refund.id, Refund.state)).all()),
            "tpaga_refunds": len(world.ledger()["refunds"]),
        }
