"""A real worker whose database is unreachable: the task retries with short countdowns (never longer than the
visibility timeout), and no log line carries the database password or SQL parameters."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from billing.sandbox import DEFAULT_PRIVATE_KEY
from tasks.testing import free_port, private_redis_db, process_env, worker

pytestmark = [pytest.mark.celery, pytest.mark.redis, pytest.mark.slow]

PASSWORD = "hunter2-not-a-real-password"


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


def test_a_database_outage_is_retried_shortly_and_quietly(redis_db_url: str, tmp_path: Path) -> None:
    # Given a worker whose PostgreSQL is not there (nothing listens on the port)
    env = process_env(
        {
            "DATABASE_URL": f"postgresql://billing:{PASSWORD}@127.0.0.1:{free_port()}/billing?connect_timeout=2",
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": "http://127.0.0.1:9/api/",
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
        }
    )
    sender = Celery("another-app", broker=redis_db_url)
    try:
        with worker(env, tmp_path / "worker.log") as proc:
            proc.wait_for_log(r"ready\.")
            # When a charge is requested
            task_id = sender.send_task("billing.charge_invoice", kwargs={"invoice_id": 77}, queue="billing.charges").id
            # Then it is retried, twice within a few seconds, with jittered countdowns of seconds
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                countdowns = [
                    float(m.group(1)) for m in re.finditer(rf"\[{task_id}\] retry: Retry in ([\d.]+)s", proc.log_text())
                ]
                if len(countdowns) >= 2:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"no retries; worker log:\n{proc.log_text()[-3000:]}")
            log = proc.log_text()
    finally:
        sender.close()
    assert 1 <= countdowns[0] <= 2
    assert 2 <= countdowns[1] <= 4
    assert "TransientError('database unavailable (OperationalError/" in log
    assert PASSWORD not in log
    assert "[SQL:" not in log and "parameters" not in log
    assert "Traceback" not in log
