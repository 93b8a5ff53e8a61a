"""Scenario 2, duplicate delivery: the same charge message sent by name two dozen times at once, two beats at
once, the outbox relay racing the publish-after-commit, and a message Redis hands out again after the
visibility timeout because the worker that held it was SIGKILLed.

Celery on Redis is at-least-once: every one of these delivers work twice or more. The database must make
the copies harmless: one invoice per period, one charge per invoice.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from billing.db.models import ChargeAttempt, Invoice
from billing.services import invoicing
from billing.services.outbox import relay_outbox
from tasks.wiring import CeleryPublisher
from tests.procs import send_by_name
from tests.reliability.harness import results, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]

VISIBILITY_SECONDS = 61  # the smallest the worker accepts: it must exceed the longest retry countdown (60 s)


def test_duplicate_deliveries_charge_each_invoice_once(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1, "visibility_timeout_seconds": VISIBILITY_SECONDS}
    with timed(figures):
        world = make_world("2. duplicate delivery")
        world.env_defaults.update(
            BILLING_VISIBILITY_TIMEOUT=str(VISIBILITY_SECONDS),
            BILLING_TASK_TIME_LIMIT="60",
            BILLING_TASK_SOFT_TIME_LIMIT="50",
        )
        duplicates = 0

        # (d, part 1) A worker takes a charge message and is SIGKILLed while the charge is `sending`: the
        # message stays unacknowledged in Redis until the visibility timeout passes.
        world.seed(approve=1, backdated_share=0)
        assert invoicing.open_due_invoices(world.ctx) == 1  # no publisher here: only the message below
        with world.ctx.sessions() as s:
            held_invoice = s.execute(select(Invoice.id)).scalar_one()
        world.faults(nextCharges=["slow"], slowSeconds=10)
        holder = world.start_worker("holder", TPAGA_READ_TIMEOUT="12", BILLING_SENDING_LEASE_SECONDS="16")
        holder.wait_for_log(r"ready\.", 60)
        [(_, held_task)] = send_by_name(
            world.redis.url, [("held", "billing.charge_invoice", "billing.charges", [], {"invoice_id": held_invoice})]
        )
        held_attempt = world.wait_for(
            "select id from charge_attempts where invoice_id = :i and state = 'sending'",
            "the held charge in flight",
            i=held_invoice,
        )
        assert held_attempt in world.kill(holder)
        killed_at = time.monotonic()
        unacked = world.redis.cli("hlen", "unacked").strip()
        figures["unacked_after_kill"] = int(unacked or 0)
        assert figures["unacked_after_kill"] >= 1, "the killed worker's message should wait in Redis"

        workers = [world.start_worker(name) for name in ("w1", "w2")]
        for proc in workers:
            proc.wait_for_log(r"ready\.", 60)

        # (a) The same charge_invoice message, by name from another app, 24 times at once for each invoice
        copies = 24
        batch = world.seed(approve=scaled(10), backdated_share=0)
        invoicing.open_due_invoices(world.ctx)
        with world.ctx.sessions() as s:
            targets = list(
                s.execute(select(Invoice.id).where(Invoice.subscription_id.in_(batch.subscription_ids))).scalars()
            )
        sends = [
            (f"{invoice}-{n}", "billing.charge_invoice", "billing.charges", [], {"invoice_id": invoice})
            for n in range(copies)
            for invoice in targets
        ]
        sent = send_by_name(world.redis.url, sends, threads=24)
        duplicates += len(sent) - len(targets)
        world.wait_for(
            "select count(*) = :n from invoices where id = any(:ids) and state = 'paid'",
            "the duplicated invoices paid",
            60,
            n=len(targets),
            ids=targets,
        )
        task_ids = {task_id for _, task_id in sent}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = [r for task_id, r in results(world.logs()) if task_id in task_ids]
            if len(done) == len(sent):
                break
            time.sleep(0.5)
        per_invoice: dict[int, list[str]] = {}
        for result in done:
            per_invoice.setdefault(result["invoice_id"], []).append(result["outcome"])
        assert len(done) == len(sent), f"{len(done)} of {len(sent)} copies ran"
        for invoice, outs in per_invoice.items():
            assert outs.count("approved") == 1, (invoice, outs)
        figures["same_message_copies"] = f"{copies} x {len(targets)} invoices"
        figures["copies_outcomes"] = dict(
            sorted(
                {
                    o: sum(x.count(o) for x in per_invoice.values())
                    for o in {o for x in per_invoice.values() for o in x}
                }.items()
            )
        )

        # (b, c) Two beats at once, the outbox relayed every second with no minimum age (racing the
        # publish-after-commit), and this process relaying the same outbox in a tight loop as well
        due = world.seed(approve=scaled(100))
        beats = [world.start_beat(f"beat{n}", BILLING_OUTBOX_MIN_AGE_SECONDS="0") for n in (1, 2)]
        relay_app = Celery("relay-racer", broker=world.redis.url)
        racer_ctx = dataclasses.replace(world.ctx, publisher=CeleryPublisher(relay_app))
        relayed = {"published": 0}
        stop = threading.Event()

        def race() -> None:
            while not stop.is_set():
                relayed["published"] += relay_outbox(racer_ctx, min_age=timedelta(0))["published"]
                time.sleep(0.02)

        racer = threading.Thread(target=race, daemon=True)
        racer.start()
        try:
            assert world.wait_settled(60), world.counts()
        finally:
            stop.set()
            racer.join(10)
            relay_app.close()
        figures["relayed_by_the_racing_relay"] = relayed["published"]
        log = world.logs()
        figures["lease_held_skips"] = log.count("lease held")
        figures["beats"] = len(beats)
        assert figures["lease_held_skips"] > 0, "both beats should have sent the same ticks"
        with world.ctx.sessions() as s:
            opened = (
                s.execute(select(Invoice.id).where(Invoice.subscription_id.in_(due.subscription_ids))).scalars().all()
            )
        figures["opened_by_two_beats"] = len(opened)

        # (d, part 2) Once the visibility timeout has passed, a worker that (re)starts restores the dead
        # worker's message and it runs again: its invoice is in review, so nothing is charged.
        time.sleep(max(0.0, killed_at + VISIBILITY_SECONDS + 1 - time.monotonic()))
        restarted = world.start_worker("holder")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            again = [r for task_id, r in results(world.logs()) if task_id == held_task]
            if again:
                break
            time.sleep(0.5)
        assert again, f"the held message was not redelivered:\n{restarted.log_text()[-3000:]}"
        figures["redelivered_after_visibility_timeout"] = again[0]["outcome"]
        assert again[0]["outcome"] == "in_review", again
        with world.ctx.sessions() as s:
            attempts = s.execute(select(ChargeAttempt.state).where(ChargeAttempt.invoice_id == held_invoice)).all()
        assert [a.state for a in attempts] == ["unknown"]
        duplicates += 1
        for proc in [*workers, *beats, restarted]:
            proc.stop()
        figures["duplicated_messages_sent"] = duplicates
    prove(world, figures)
