"""Scenario 4, database faults: the workers' PostgreSQL connections are terminated again and again while
billing runs (`pg_terminate_backend`, only this test's connections, found by their application_name).

Workers must recover (the pool reconnects), interrupted tasks retry with short countdowns, outcomes already
paid for at Tpaga are recorded after a retry, and nothing is lost or charged twice.

A full server restart would disturb whatever else uses the machine's shared PostgreSQL, so it runs against a
private cluster the test creates (initdb into a temporary directory, as user postgres when run as root),
restarted with `pg_ctl restart -m fast`, and only with RELIABILITY_PG_RESTART=1 (the full run and CI set it).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import service_missing
from tests.procs import PostgresServer
from tests.reliability.harness import scaled, timed
from tests.reliability.proof import prove

pytestmark = [pytest.mark.reliability, pytest.mark.celery, pytest.mark.postgres, pytest.mark.slow]


def _run(world: Any, figures: dict[str, Any], fault: Any, rounds: int, counted: str) -> None:
    total = scaled(200)
    world.seed(approve=total - 4, soft=2, unknown=2)
    world.faults(latencyMs=200)
    workers = [world.start_worker(name) for name in ("w1", "w2")]
    for proc in workers:
        proc.wait_for_log(r"ready\.", 60)
    world.start_beat()
    world.wait_for("select count(*) >= :n from charge_attempts", "billing under way", 60, n=scaled(20))
    killed = 0
    for _ in range(rounds):
        killed += fault()
        time.sleep(0.8)
    figures["fault_rounds"] = rounds
    figures[counted] = killed
    assert world.wait_settled(120), world.counts()
    log = world.logs()
    figures["task_retries_after_database_errors"] = len(re.findall(r"retry: Retry in", log))
    figures["outcome_recording_retries"] = log.count("recording a charge outcome failed")
    for proc in workers:
        proc.stop()


def test_database_connections_terminated_mid_run_lose_nothing(make_world: Any) -> None:
    figures: dict[str, Any] = {"runs": 1}
    with timed(figures):
        world = make_world("4. database faults")
        _run(world, figures, world.terminate_worker_connections, scaled(8), "connections_terminated")
    prove(world, figures)


# An opt-in, not a missing service (so not service_missing): a developer's run leaves it out, .ci/run sets it.
@pytest.mark.skipif(
    os.environ.get("RELIABILITY_PG_RESTART") != "1",
    reason="restarts a PostgreSQL server (a private one it creates): only in the full run, RELIABILITY_PG_RESTART=1",
)
def test_postgresql_restarted_mid_run_loses_nothing(make_world: Any) -> None:
    try:
        server = PostgresServer().start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        service_missing("a private PostgreSQL cluster", f"initdb or pg_ctl failed: {exc}")
    figures: dict[str, Any] = {"runs": 1}
    world = None
    try:
        with timed(figures):
            world = make_world("4b. database server restarted", database_url=server.url)
            _run(world, figures, lambda: server.restart() or 1, scaled(2), "server_restarts")
        prove(world, figures)
    finally:
        if world is not None:
            world.close()  # the workers stop before their database goes away
        server.stop()
