"""Nothing at import time: another app may import `tasks.client` wherever it runs, whatever `.env` it finds.

Importing `tasks` or `tasks.client` reads no `.env`, raises nothing and patches nothing (logging, Celery's event
state, kombu); the `celery -A tasks ...` commands still read the settings before they start and stop on a
malformed one, naming the variable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from billing.db import migrate
from billing.db.engine import make_engine
from tasks.testing import CeleryProcess, process_env, worker

MALFORMED_ENV = "BILLING_SENDING_LEASE_SECONDS=abc\nCELERY_BROKER_URL=redis://nowhere.invalid:1/0\n"

# Imports tasks.client in a directory whose .env is malformed, checks that importing changed nothing, then
# sends with the sender's own Celery app.
SENDER = textwrap.dedent(
    """
    import json, logging, os, sys
    from datetime import datetime, timedelta, timezone
    from decimal import Decimal
    factory = logging.getLogRecordFactory()
    environ = dict(os.environ)

    import tasks.client
    from celery import Celery
    from celery.events import state as event_state
    from kombu.transport import redis as kombu_redis

    import tasks

    assert dict(os.environ) == environ, "importing read .env"
    assert not tasks.app.configured, "importing configured the app"
    assert logging.getLogRecordFactory() is factory, "importing patched logging"
    assert not hasattr(event_state.Task.event, "_billing_ignores_client_arguments"), "importing patched events"
    assert not hasattr(kombu_redis.Channel._connparams, "_billing_detached_transport_is_a_connection_error")

    shop = Celery("shop", broker=sys.argv[1])
    task_id = tasks.client.send(shop, "billing.charge_invoice", invoice_id=987654)
    card_task_id = tasks.client.send_attach_card(shop, 987654, "tok_import_test")
    bogota = timezone(timedelta(hours=-5))
    plan_task_id = tasks.client.upsert_plan(
        shop, code="import-gold", amount=Decimal("4.5E+4"), currency="COP", interval="month", name="Gold",
        issued_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=bogota),
    )
    sub_task_id = tasks.client.create_subscription(
        shop, external_id="sub-import", external_customer_id="cus-import", plan_code="import-gold",
        anchor_at=datetime(2030, 1, 31, 9, 0, tzinfo=bogota), request_id="import-sub-1",
    )
    card2_task_id = tasks.client.attach_card(shop, token="tok_import_test_2", external_customer_id="cus-import")
    assert not [name for name in shop.tasks if name.startswith("billing.")], "our tasks joined the sender's app"
    assert not tasks.app.configured and logging.getLogRecordFactory() is factory, "sending configured our app"
    print(json.dumps([task_id, card_task_id, plan_task_id, sub_task_id, card2_task_id]))
    """
)


@pytest.fixture
def malformed_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "shop"
    directory.mkdir()
    (directory / ".env").write_text(MALFORMED_ENV)
    return directory


def test_tasks_client_imports_and_sends_where_the_env_file_is_malformed(
    malformed_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    # Given the embedded broker, and a worker started in a good directory
    broker_url = f"sqla+sqlite:///{tmp_path}/broker.db"
    migrate.upgrade(sqlite_url)
    env = process_env(
        {
            "DATABASE_URL": sqlite_url,
            "CELERY_BROKER_URL": broker_url,
            "TPAGA_PRIVATE_KEY": "pk_test",  # never used: the ids name nothing
            "TPAGA_PUBLIC_KEY": "pub_test",
            # A command naming a customer not there yet is refused at once instead of retried for 15 minutes.
            "BILLING_COMMAND_WAIT_SECONDS": "0",
        }
    )
    proc = worker(env, tmp_path / "worker.log")
    proc.cwd = tmp_path  # a good directory: no .env
    with proc:
        proc.wait_for_log(r"ready\.", 60)

        # When another app imports tasks.client where a malformed .env lies, and sends
        sent = subprocess.run(
            [sys.executable, "-c", SENDER, broker_url],
            capture_output=True,
            text=True,
            cwd=malformed_dir,
            env=process_env({}),
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr[-3000:]
        charge_id, card_id, plan_id, sub_id, card2_id = json.loads(sent.stdout.strip().splitlines()[-1])

        # Then the worker receives them all and runs them: the ids name nothing, so each fails once, precisely
        proc.wait_for_log(rf"billing.charge_invoice\[{charge_id}\] raised expected: TaskInputError", 60)
        proc.wait_for_log(rf"billing.attach_card\[{card_id}\] raised expected: TaskInputError", 60)
        assert "customer 987654 does not exist" in proc.log_text()
        # ... the helpers' datetimes parse on the worker (else "must be an ISO 8601 time"): the subscription
        # and the card wait for their customer, refused at once with the wait set to 0 s
        proc.wait_for_log(rf"billing.create_subscription\[{sub_id}\] raised expected: TaskInputError", 60)
        proc.wait_for_log(rf"billing.attach_card\[{card2_id}\] raised expected: TaskInputError", 60)
        assert "customer 'cus-import' does not exist (yet) after waiting" in proc.log_text()
        assert "ISO 8601" not in proc.log_text()
        # ... and the plan is created from the Decimal, its name and its issued_at
        proc.wait_for_log(rf"billing.upsert_plan\[{plan_id}\] succeeded", 60)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        plan = conn.execute(text("select amount_minor, currency, name from plans where code = 'import-gold'")).one()
        refused = conn.execute(text("select status from commands where request_id = 'import-sub-1'")).scalar_one()
    engine.dispose()
    assert tuple(plan) == (4_500_000, "COP", "Gold")
    assert refused == "rejected"
    assert "tok_import_test" not in proc.log_text()


def _output_of_a_refused_start(proc: CeleryProcess) -> list[str]:
    """Run `proc` to its end; it must exit 1. Its output, line by line."""
    with proc:
        assert proc.proc is not None
        proc.proc.wait(60)
    assert proc.proc.returncode == 1, proc.log_text()[-3000:]
    return proc.log_text().strip().splitlines()


@pytest.mark.parametrize("command", ["worker", "beat", "flower"])
def test_a_celery_command_started_with_a_malformed_setting_stops_naming_the_variable(
    malformed_dir: Path, command: str
) -> None:
    proc = CeleryProcess([command], process_env({}), malformed_dir.parent / f"{command}.log", cwd=malformed_dir)
    # The one line the `billing` command gives for it, not a traceback through Celery's option parsing
    assert _output_of_a_refused_start(proc) == [
        "Error: configuration: BILLING_SENDING_LEASE_SECONDS must be an integer, got 'abc'"
    ]


def test_a_worker_given_a_malformed_worker_setting_in_its_environment_stops_with_one_line(tmp_path: Path) -> None:
    proc = CeleryProcess(["worker", "--pool", "solo"], process_env({"BILLING_LOG_LEVEL": "loud"}), tmp_path / "w.log")
    assert _output_of_a_refused_start(proc) == [
        "Error: configuration: BILLING_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got 'loud'"
    ]
