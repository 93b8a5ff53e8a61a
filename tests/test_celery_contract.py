"""The public task contract, end to end with real processes: a `celery -A tasks worker` subprocess on Redis,
PostgreSQL, the emulator over HTTP, and a separate sender process that does not import this project (a bare
Celery app sending by name), as another app would. Effects are read from the database."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Card, ChargeAttempt, Invoice, Refund, Subscription
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, invoicing
from billing.services.context import Context
from tasks.testing import CeleryProcess, private_redis_db, process_env, worker

pytestmark = [pytest.mark.celery, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

# A bare Celery app: no import of `billing` or `tasks`, routing by the documented queue names.
SENDER = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    broker, sends = sys.argv[1], json.loads(sys.argv[2])
    app = Celery("someone-else", broker=broker)
    ids = {}
    for key, name, queue, args, kwargs in sends:
        ids[key] = app.send_task(name, args=args, kwargs=kwargs, queue=queue).id
    assert not any(m.split(".")[0] in ("billing", "tasks") for m in sys.modules), "sender imported the project"
    print(json.dumps(ids))
    """
)


def send_by_name(broker_url: str, sends: list[tuple[str, str, str, list[Any], dict[str, Any]]]) -> dict[str, str]:
    """Run the foreign sender; returns {key: task id}."""
    out = subprocess.run(
        [sys.executable, "-c", SENDER, broker_url, json.dumps(sends)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=process_env({}) | {"PYTHONPATH": ""},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def wait_until(check: Callable[[], Any], what: str, worker_proc: CeleryProcess, timeout_seconds: float = 30) -> Any:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; worker log tail:\n{worker_proc.log_text()[-3000:]}")


def worker_env(pg_url: str, broker_url: str, sandbox: Any, **extra: str) -> dict[str, str]:
    """A worker's environment: this test's database, broker and emulator, the emulator's keys."""
    return process_env(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": broker_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            **extra,
        }
    )


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture
def world(pg_url: str, sandbox: Any) -> Iterator[tuple[Context, TpagaClient]]:
    migrate.upgrade(pg_url)
    settings = Settings(
        database_url=pg_url,
        tpaga_api_url=sandbox.api_url,
        tpaga_private_key=DEFAULT_PRIVATE_KEY,
        tpaga_public_key=DEFAULT_PUBLIC_KEY,
    )
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = build_context(settings, gateway=gateway)  # no publisher: the test process enqueues nothing
    yield ctx, gateway
    gateway.close()
    bind = ctx.sessions.kw["bind"]
    bind.dispose()


def test_every_public_task_sent_by_name_from_another_app(
    world: tuple[Context, TpagaClient], pg_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    ctx, gateway = world
    # Given a plan, a customer with a card and a due invoice, and a customer without a card yet
    plan_id = catalog.create_plan(ctx, code="monthly", name="Monthly", amount=Money.from_major("45000", "COP"))
    ada = catalog.create_customer(ctx, email="ada@example.com", first_name="Ada")
    catalog.attach_card(
        ctx,
        customer_id=ada,
        token=gateway.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2031, holder_name="Ada"),
    )
    ada_sub = catalog.subscribe(ctx, customer_id=ada, plan_id=plan_id)
    assert invoicing.open_due_invoices(ctx) == 1
    with ctx.sessions() as s:
        ada_invoice = s.execute(select(Invoice.id).where(Invoice.subscription_id == ada_sub)).scalar_one()
    bob = catalog.create_customer(ctx, email="bob@example.com", first_name="Bob")
    bob_token = gateway.tokenize_card(number="4242424242424242", exp_month=11, exp_year=2031, holder_name="Bob")
    bogus_token = "tok_NOT_A_REAL_TOKEN_e3b0c44298fc"

    env = worker_env(pg_url, redis_db_url, sandbox)
    with worker(env, tmp_path / "worker.log") as proc:
        proc.wait_for_log(r"ready\.")
        # (A worker checks its database connection before it says ready: nothing to warn about here.)
        assert "warm start" not in proc.log_text()

        # When another app sends the public tasks by name, with good and bad arguments
        bad = {
            "id_as_string": ("billing.charge_invoice", "billing.charges", [], {"invoice_id": str(ada_invoice)}),
            "id_as_float": ("billing.charge_invoice", "billing.charges", [], {"invoice_id": 1.5}),
            "id_as_bool": ("billing.charge_invoice", "billing.charges", [], {"invoice_id": True}),
            "missing": ("billing.charge_invoice", "billing.charges", [], {}),
            "extra": ("billing.charge_invoice", "billing.charges", [], {"invoice_id": ada_invoice, "force": True}),
            "positional": ("billing.charge_invoice", "billing.charges", [ada_invoice], {}),
            "unknown_invoice": ("billing.charge_invoice", "billing.charges", [], {"invoice_id": 987654}),
            "unknown_customer": (
                "billing.attach_card",
                "billing.default",
                [],
                {"customer_id": 987654, "token": bogus_token},
            ),
            "unknown_refund_invoice": (
                "billing.request_refund",
                "billing.refunds",
                [],
                {"invoice_id": 987654, "reason": "x"},
            ),
            "refund_without_charge": ("billing.request_refund", "billing.refunds", [], {"reason": "x"}),
            "flag_as_string": (
                "billing.cancel_subscription",
                "billing.default",
                [],
                {"subscription_id": ada_sub, "at_period_end": "yes"},
            ),
            "unknown_refund": ("billing.execute_refund", "billing.refunds", [], {"refund_id": 987654}),
        }
        misspelled = (
            "misspelled",
            "billing.attach_crd",
            "billing.default",
            [],
            {"customer_id": bob, "token": bogus_token},
        )
        good = [
            ("charge", "billing.charge_invoice", "billing.charges", [], {"invoice_id": ada_invoice}),
            ("attach", "billing.attach_card", "billing.default", [], {"customer_id": bob, "token": bob_token}),
        ]
        ids = send_by_name(redis_db_url, [*good, misspelled, *[(key, *spec) for key, spec in bad.items()]])

        # Then the invoice is paid and the card attached
        def ada_paid() -> bool:
            with ctx.sessions() as s:
                return s.get(Invoice, ada_invoice).state == "paid"  # type: ignore[union-attr]

        wait_until(ada_paid, "invoice paid by billing.charge_invoice", proc)

        def bob_card() -> int | None:
            with ctx.sessions() as s:
                return s.execute(select(Card.id).where(Card.customer_id == bob)).scalar_one_or_none()

        bob_card_id = wait_until(bob_card, "card attached by billing.attach_card", proc)

        # And every bad call failed exactly once, with a precise message, without a retry
        expected = {
            "id_as_string": f"invoice_id must be an integer id, got '{ada_invoice}' (a str)",
            "id_as_float": "invoice_id must be an integer id, got 1.5 (a float)",
            "id_as_bool": "invoice_id must be an integer id, got True (a bool)",
            "missing": "missing required argument(s) invoice_id",
            "extra": "unexpected argument(s) force; it takes invoice_id",
            "positional": "takes keyword arguments only (invoice_id); got 1 positional argument(s)",
            "unknown_invoice": "invoice 987654 does not exist",
            "unknown_customer": "customer 987654 does not exist",
            "unknown_refund_invoice": "invoice 987654 does not exist",
            "refund_without_charge": "give exactly one of invoice_id or charge_id",
            "flag_as_string": "at_period_end must be true or false, got 'yes' (a str)",
            "unknown_refund": "refund 987654 does not exist",
        }
        for key, message in expected.items():
            task_id = ids[key]
            lines = wait_until(
                lambda task_id=task_id: [ln for ln in proc.log_text().splitlines() if task_id in ln and "raised" in ln],
                f"the failure of {key}",
                proc,
                timeout_seconds=15,
            )
            assert len(lines) == 1, (key, lines)
            assert "raised expected: TaskInputError" in lines[0], (key, lines[0])
            assert message in lines[0], (key, lines[0])
        # A misspelled name is discarded, logged without its arguments (the token).
        proc.wait_for_log(r"Received unregistered task of type 'billing.attach_crd'", timeout_seconds=15)
        with ctx.sessions() as s:
            assert s.get(Subscription, ada_sub).status == "active"  # type: ignore[union-attr]
            assert s.execute(select(func.count(ChargeAttempt.id))).scalar_one() == 1
            assert s.execute(select(func.count(Refund.id))).scalar_one() == 0

        # When Bob subscribes and the other app sends the periodic open, a refund by invoice and a cancel
        bob_sub = catalog.subscribe(ctx, customer_id=bob, plan_id=plan_id)
        ids |= send_by_name(
            redis_db_url,
            [
                ("open", "billing.open_due_invoices", "billing.scheduler", [], {}),
                (
                    "refund",
                    "billing.request_refund",
                    "billing.refunds",
                    [],
                    {"invoice_id": ada_invoice, "reason": "asked"},
                ),
                ("cancel", "billing.cancel_subscription", "billing.default", [], {"subscription_id": ada_sub}),
            ],
        )

        # Then Bob's invoice is opened and charged through the outbox, Ada's charge is voided, her plan canceled
        def bob_paid_attempt() -> int | None:
            with ctx.sessions() as s:
                return s.execute(
                    select(ChargeAttempt.id)
                    .join(Invoice, Invoice.id == ChargeAttempt.invoice_id)
                    .where(
                        Invoice.subscription_id == bob_sub, Invoice.state == "paid", ChargeAttempt.state == "approved"
                    )
                ).scalar_one_or_none()

        bob_attempt = wait_until(bob_paid_attempt, "Bob's invoice opened and paid", proc)

        def ada_refund_state() -> str | None:
            with ctx.sessions() as s:
                state = s.execute(select(Refund.state).where(Refund.invoice_id == ada_invoice)).scalar_one_or_none()
                return state if state == "voided" else None

        wait_until(ada_refund_state, "Ada's refund voided", proc)

        def ada_canceled() -> bool:
            with ctx.sessions() as s:
                return s.get(Subscription, ada_sub).status == "canceled"  # type: ignore[union-attr]

        wait_until(ada_canceled, "Ada's subscription canceled", proc)

        # And a refund can name the charge by the attempt id charge_invoice returned
        ids |= send_by_name(
            redis_db_url,
            [
                (
                    "refund_by_charge",
                    "billing.request_refund",
                    "billing.refunds",
                    [],
                    {"charge_id": bob_attempt, "reason": "dup"},
                )
            ],
        )

        def bob_refund() -> str | None:
            with ctx.sessions() as s:
                return s.execute(
                    select(Refund.state).where(Refund.charge_attempt_id == bob_attempt, Refund.state == "voided")
                ).scalar_one_or_none()

        wait_until(bob_refund, "Bob's refund (by charge_id) voided", proc)
        log = proc.log_text()

    # Secrets stayed out of the worker's log; no task was retried.
    with ctx.sessions() as s:
        card_ids = list(s.execute(select(Card.tpaga_card_id)).scalars())
    assert bob_card_id
    for secret in (bob_token, bogus_token, DEFAULT_PRIVATE_KEY, *card_ids):
        assert secret not in log
    assert not re.search(r"Retry in \d", log)
    for key in ("charge", "attach", "open", "refund", "cancel", "refund_by_charge"):
        assert re.search(rf"\[{ids[key]}\] succeeded", log), key


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_batch_sent_by_name_is_charged_on_the_event_loop_and_the_worker_stops_cleanly(
    world: tuple[Context, TpagaClient], sandbox: Any, pg_url: str, redis_db_url: str, tmp_path: Path, pool: str
) -> None:
    ctx, gateway = world
    # Given three due invoices of one customer with a card
    plan_id = catalog.create_plan(ctx, code="daily", name="Daily", amount=Money.from_major("9900", "COP"))
    cy = catalog.create_customer(ctx, email="cy@example.com", first_name="Cy")
    token = gateway.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2031, holder_name="Cy")
    catalog.attach_card(ctx, customer_id=cy, token=token)
    subs = [catalog.subscribe(ctx, customer_id=cy, plan_id=plan_id) for _ in range(3)]
    assert invoicing.open_due_invoices(ctx) == 3
    with ctx.sessions() as s:
        invoice_ids = list(s.execute(select(Invoice.id).where(Invoice.subscription_id.in_(subs))).scalars())

    env = worker_env(pg_url, redis_db_url, sandbox, BILLING_WORKER_POOL=pool)
    log = tmp_path / "worker.log"
    # (no --pool flag: the app's pool, from BILLING_WORKER_POOL, as `celery -A tasks worker` runs it)
    args = ["worker", "--loglevel", "INFO", "--concurrency", "2", "--without-mingle", "--without-gossip"]
    with CeleryProcess(args, env, log) as proc:
        proc.wait_for_log(r"ready\.", 60)
        # When another app sends the batch task by name
        send_by_name(
            redis_db_url, [("batch", "billing.charge_invoices", "billing.charges", [], {"invoice_ids": invoice_ids})]
        )

        # Then every invoice is paid by one approved attempt, through the worker's event loop
        def all_paid() -> bool:
            with ctx.sessions() as s:
                states = s.execute(select(Invoice.state).where(Invoice.id.in_(invoice_ids))).scalars().all()
            return list(states) == ["paid"] * 3

        wait_until(all_paid, "the batch's invoices paid", proc)
        with ctx.sessions() as s:
            approved = s.execute(
                select(func.count()).where(ChargeAttempt.invoice_id.in_(invoice_ids), ChargeAttempt.state == "approved")
            ).scalar_one()
        assert approved == 3
        # And a warm shutdown (SIGTERM) ends it cleanly: exit 0, no unclosed aiohttp session reported, no traceback
        proc.stop(30)
        assert proc.proc is not None and proc.proc.returncode == 0
    text = log.read_text(errors="replace")
    assert "Unclosed" not in text
    assert "Traceback" not in text
