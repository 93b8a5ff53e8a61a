"""Scenario 1, crashes: workers SIGKILLed again and again while hundreds of due subscriptions are billed, and
one worker killed at the worst moment (its attempt `sending`, the answer not yet back).

Invariants: no double charge (the attempt row and its lease, never the broker, decide), no lost renewal (the
sweep and reconciliation find what the dead worker held), the ambiguous attempt is flagged for review.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.reliability.harness import SCALE, Phases, outcomes, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]


def test_workers_killed_while_billing_never_charge_twice_nor_lose_a_renewal(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    phase = Phases(figures)
    with timed(figures):
        # Given hundreds of due subscriptions (a fifth of them two or three periods behind), a few cards that
        # decline or answer 9999, two workers and a beat, and a gateway that takes 400 ms per call; small
        # batches and few threads keep billing going for several seconds, so that the kills hit charges in flight
        with phase("seed"):
            world = make_world("1. crashes")
            world.env_defaults.update(BILLING_CHARGE_BATCH_SIZE="5")
            total = scaled(300)
            odd = scaled(4)
            world.seed(approve=total - 3 * odd, soft=odd, hard=odd, unknown=odd)
            world.faults(latencyMs=400)
        with phase("start"):
            workers = {name: world.start_worker(name, 2) for name in ("w1", "w2")}
            for proc in workers.values():
                proc.wait_for_log(r"ready\.", 60)
            world.start_beat()

        # When a random worker is SIGKILLed every second or so while billing runs, and restarted
        rng = random.Random(11)
        hits = 0
        with phase("random kills"):
            deadline = time.monotonic() + 90 * SCALE
            while world.kills < scaled(6) and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.6, 1.6))
                name = rng.choice(sorted(workers))
                hits += bool(world.kill(workers[name]))
                time.sleep(rng.uniform(0.2, 0.6))
                workers[name] = world.start_worker(name, 2)
        figures["random_kills"] = world.kills
        figures["random_kills_with_charges_in_flight"] = hits
        with phase("recovery"):
            assert world.wait_settled(90 * SCALE), world.counts()

        # And then a worker is killed after its attempt is `sending` and before the answer is back
        with phase("deterministic kill"):
            for proc in workers.values():
                proc.stop()
            world.faults(latencyMs=300, nextCharges=["slow"], slowSeconds=15)
            victim = world.start_worker("victim", TPAGA_READ_TIMEOUT="10", BILLING_SENDING_LEASE_SECONDS="14")
            victim.wait_for_log(r"ready\.", 60)
            world.seed(approve=1, backdated_share=0)
            attempt_id = world.wait_for(
                "select a.id from charge_attempts a where a.state = 'sending'", "an attempt in flight", 30
            )
            order_id = world.wait_for(
                "select order_id from charge_attempts where id = :id", "its orderId", id=attempt_id
            )
            # The worst moment: Tpaga has made the charge (it is in the ledger), its answer is on the way.
            deadline = time.monotonic() + 10
            while not world.ledger_of(order_id) and time.monotonic() < deadline:
                time.sleep(0.02)
            charged_before_the_kill = bool(world.ledger_of(order_id))
            assert attempt_id in world.kill(victim)
            survivor = world.start_worker("survivor")
            world.faults(latencyMs=0)

        # Then after the lease, reconciliation flags it unknown and its invoice waits in review
        with phase("flagged after the lease"):
            world.wait_for(
                "select 1 from charge_attempts a join invoices i on i.id = a.invoice_id where a.id = :id "
                "and a.state = 'unknown' and a.unknown_reason = 'lease_expired' and i.state = 'review'",
                "the killed attempt flagged for review",
                30,
                id=attempt_id,
            )
        with phase("no second charge"):
            time.sleep(3)  # more sweeps and reconciliations: the invoice must not be charged again
            assert world.wait_settled(30), world.counts()
        figures["deterministic_kill"] = {
            "charged_at_tpaga_before_the_kill": charged_before_the_kill,
            "flagged_unknown_after_the_lease": True,
            "charges_at_tpaga_for_that_invoice": len(world.ledger_of(order_id)),
        }
        assert charged_before_the_kill
        assert len(world.ledger_of(order_id.rsplit("-a", 1)[0] + "-a")) == 1
        survivor.stop()
        figures["charge_outcomes"] = dict(sorted(outcomes(world.logs()).items()))
    prove(world, figures)
