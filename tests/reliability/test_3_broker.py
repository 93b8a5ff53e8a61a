"""Scenario 3, broker faults: the test's own redis-server is shut down without saving and restarted while
billing runs (every queued and unacknowledged message is gone), then flushed (FLUSHALL) mid-run.

The broker is a lossy accelerator: the database still knows every due invoice, and beat's sweep, the outbox
relay and reconciliation re-create the lost work. Nothing is lost, nothing is charged twice.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from billing.db.models import ChargeAttempt
from tests.reliability.harness import Phases, scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]


def _messages(world: Any) -> int:
    """Messages waiting in the charges queue plus those workers hold unacknowledged."""
    waiting = world.redis.cli("llen", "billing.charges").strip() or "0"
    held = world.redis.cli("hlen", "unacked").strip() or "0"
    return int(waiting) + int(held)


def _attempts(world: Any) -> int:
    with world.ctx.sessions() as s:
        return int(s.execute(select(func.count(ChargeAttempt.id))).scalar_one())


def test_redis_restarted_and_flushed_mid_run_loses_no_renewal(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    phase = Phases(figures)
    with timed(figures):
        # Given due subscriptions, two workers and a beat on a Redis of this test's own
        with phase("seed"):
            world = make_world("3. broker faults")
            total = scaled(200)
            world.seed(approve=total - 4, soft=2, unknown=2)
            world.faults(latencyMs=200)
        with phase("start"):
            workers = [world.start_worker(name) for name in ("w1", "w2")]
            for proc in workers:
                proc.wait_for_log(r"ready\.", 60)
            world.start_beat()
        destroyed = []

        # When Redis is shut down without saving while billing runs, and comes back 2 s later
        with phase("restart"):
            world.wait_for("select count(*) >= :n from charge_attempts", "billing under way", 60, n=scaled(30))
            destroyed.append(_messages(world))
            world.redis.restart(down_seconds=2)
            so_far = _attempts(world)

        # And, once billing has picked up again, everything Redis holds is flushed
        with phase("flush"):
            world.wait_for(
                "select count(*) >= :n from charge_attempts", "billing resumed after the restart", 60, n=so_far + 20
            )
            destroyed.append(_messages(world))
            world.redis.flushall()

        # Then every renewal is still charged exactly once
        with phase("recovery"):
            assert world.wait_settled(90), world.counts()
        log = world.logs()
        figures["redis_restarts"] = world.redis.restarts
        figures["redis_flushes"] = 1
        figures["charge_messages_destroyed"] = destroyed
        figures["worker_reconnects"] = log.count("Connection to broker lost")
        figures["workers_alive_at_the_end"] = sum(
            proc.proc is not None and proc.proc.poll() is None for proc in workers
        )
        assert figures["workers_alive_at_the_end"] == len(workers), "a worker died on the broker fault"
        for proc in workers:
            proc.stop()
    prove(world, figures)
