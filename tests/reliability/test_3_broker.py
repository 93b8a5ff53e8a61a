"""Scenario 3, broker faults: the test's own redis-server is shut down without saving and restarted while
billing runs (every queued and unacknowledged message is gone), then flushed (FLUSHALL) mid-run.

The broker is a lossy accelerator: the database still knows every due invoice, and beat's sweep, the outbox
relay and reconciliation re-create the lost work. Nothing is lost, nothing is charged twice.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.reliability.harness import Phases, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]


def _messages(world: Any) -> int:
    """Messages waiting in the charges queue plus those workers hold unacknowledged."""
    waiting = world.redis.cli("llen", "billing.charges").strip() or "0"
    held = world.redis.cli("hlen", "unacked").strip() or "0"
    return int(waiting) + int(held)


def test_redis_restarted_and_flushed_mid_run_loses_no_renewal(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    phase = Phases(figures)
    in_flight = "select count(*) from charge_attempts where state in ('pending', 'sending')"
    with timed(figures):
        # Given due subscriptions, two workers and a beat on a Redis of this test's own, and a gateway that
        # takes half a second per call (so that charges are in flight when the broker fails)
        with phase("seed"):
            world = make_world("3. broker faults")
            # Small batches and few threads: the broker holds a backlog of charge messages when it fails.
            world.env_defaults.update(BILLING_CHARGE_BATCH_SIZE="10")
            world.seed(approve=scaled(150) - 4, soft=2, unknown=2)
            world.faults(latencyMs=500)
        with phase("start"):
            workers = [world.start_worker(name, 2) for name in ("w1", "w2")]
            for proc in workers:
                proc.wait_for_log(r"ready\.", 60)
            world.start_beat()
        destroyed = []

        # When Redis is shut down without saving while charges are in flight, and comes back 2 s later
        with phase("restart"):
            world.wait_for(in_flight, "charges in flight", 60)
            destroyed.append(_messages(world))
            world.redis.restart(down_seconds=2)
        with phase("recovery after the restart"):
            assert world.wait_settled(60), world.counts()

        # And everything Redis holds is flushed while the next wave of renewals is being charged
        with phase("flush"):
            world.faults(latencyMs=0)
            world.seed(approve=scaled(100), backdated_share=0)
            world.faults(latencyMs=500)
            world.wait_for(in_flight, "the second wave in flight", 60)
            destroyed.append(_messages(world))
            world.redis.flushall()

        # Then every renewal is still charged exactly once, by workers that never stopped
        with phase("recovery after the flush"):
            assert world.wait_settled(60), world.counts()
        log = world.logs()
        figures["redis_restarts"] = world.redis.restarts
        figures["redis_flushes"] = 1
        figures["charge_messages_destroyed"] = destroyed
        figures["worker_reconnects"] = log.count("Connection to broker lost")
        figures["acks_lost_with_the_connection"] = log.count("Couldn't ack")
        figures["workers_alive_at_the_end"] = sum(
            proc.proc is not None and proc.proc.poll() is None for proc in workers
        )
        assert figures["workers_alive_at_the_end"] == len(workers), "a worker died on the broker fault"
        for proc in workers:
            proc.stop()
    prove(world, figures)
