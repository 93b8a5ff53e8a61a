"""Scenario 5, gateway faults: about 5 % each of 5xx answers (nothing charged), dropped connections (charged,
answer lost), slow answers beyond the read timeout (charged, the client gave up) and garbled bodies (charged,
answer unreadable), plus a few 9999 cards; and the API key revoked mid-run, then restored.

Every ambiguous answer must be flagged unknown and wait in review, never be retried blindly; a 401 pauses
all billing (event `billing.paused`) without spending anyone's dunning attempts, and the reconcile task's
probe resumes it once the key works again.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from sqlalchemy import select

from billing.db.models import ChargeAttempt, Event, Invoice
from billing.sandbox import DEFAULT_PRIVATE_KEY
from tests.reliability.harness import outcomes, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

RATE = 0.05
KINDS = ("5xx", "drop", "slow", "garbage")


def test_gateway_faults_are_flagged_and_a_revoked_key_pauses_without_spending_dunning(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    with timed(figures):
        # Given due subscriptions (a few on 51 and 9999 cards) and, for the next charges, a fault plan with
        # about 5 % of each kind; slow answers come after 4 s, the workers' read timeout is 2 s
        world = make_world("5. gateway faults")
        total = scaled(300)
        odd = scaled(4)
        world.seed(approve=total - 2 * odd, soft=odd, unknown=odd)
        rng = random.Random(5)
        plan = [
            next((k for i, k in enumerate(KINDS) if roll < RATE * (i + 1)), "ok")
            for roll in (rng.random() for _ in range(total * 2))
        ]
        world.faults(latencyMs=20, nextCharges=plan, slowSeconds=4)
        workers = [world.start_worker(name) for name in ("w1", "w2")]
        for proc in workers:
            proc.wait_for_log(r"ready\.", 60)
        world.start_beat()

        # When the key is revoked while billing runs
        world.wait_for("select count(*) >= :n from charge_attempts", "billing under way", 60, n=total // 3)
        world.keys("revoked-" + DEFAULT_PRIVATE_KEY[::-1])
        world.wait_for("select 1 from control where key = 'billing_paused'", "billing paused", 30)
        with world.ctx.sessions() as s:
            soft_before = dict(s.execute(select(Invoice.id, Invoice.soft_failures)).all())
        time.sleep(4)  # two sweeps and reconciliations while paused: nothing may be charged or spent
        with world.ctx.sessions() as s:
            soft_during = dict(s.execute(select(Invoice.id, Invoice.soft_failures)).all())
            unauthorized = s.execute(select(ChargeAttempt).where(ChargeAttempt.http_status == 401)).scalars().all()
            attempts_paused = s.execute(select(ChargeAttempt.id)).all()
        time.sleep(2)
        with world.ctx.sessions() as s:
            attempts_later = s.execute(select(ChargeAttempt.id)).all()

        # Then billing is paused: no new attempts, no dunning attempt spent on a 401
        assert unauthorized, "the revoked key should have been seen by a charge"
        assert {k: v for k, v in soft_during.items() if k in soft_before} == soft_before
        assert all(a.state == "not_sent" for a in unauthorized)
        assert len(attempts_later) == len(attempts_paused), "a charge was attempted while billing was paused"

        # And when the key is restored, the reconcile task's probe resumes billing and everything is charged
        world.keys(DEFAULT_PRIVATE_KEY)
        world.wait_for("select count(*) = 0 from control where key = 'billing_paused'", "billing resumed", 30)
        assert world.wait_settled(120), world.counts()
        with world.ctx.sessions() as s:
            events = dict(
                s.execute(
                    select(Event.kind, Event.id).where(Event.kind.in_(("billing.paused", "billing.resumed")))
                ).all()
            )
            spent_on_401 = s.execute(
                select(Invoice.id, Invoice.soft_failures)
                .join(ChargeAttempt, ChargeAttempt.invoice_id == Invoice.id)
                .where(ChargeAttempt.http_status == 401, Invoice.soft_failures > 0)
            ).all()
        assert set(events) == {"billing.paused", "billing.resumed"}
        assert "ALERT billing.paused" in world.logs()
        # A 401 never counts as a decline; the only soft failures are the 51 cards' own declines.
        with world.ctx.sessions() as s:
            for invoice_id, soft in spent_on_401:
                declined = s.execute(
                    select(ChargeAttempt.id).where(
                        ChargeAttempt.invoice_id == invoice_id, ChargeAttempt.decline_class == "soft"
                    )
                ).all()
                assert soft == len(declined), (invoice_id, soft, len(declined))
        figures["charges_answered_401"] = len(unauthorized)
        figures["paused_and_resumed"] = True
        figures["charge_outcomes"] = dict(sorted(outcomes(world.logs()).items()))
        for proc in workers:
            proc.stop()
    prove(world, figures)
