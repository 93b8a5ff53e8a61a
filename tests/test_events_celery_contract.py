"""The Celery endpoint's contract, end to end: another team's app, a bare Celery app that imports nothing from
this project, consumes the stream as task `someapp.on_billing_event(event=...)` on its own queue, while a real
billing worker and beat bill subscriptions through the emulator and deliver the events (billing.deliver_events).

What such an app relies on: every event arrives, a subscription's events arrive in subscription_seq order, and
the `event` kwarg is the very body a webhook receiver gets.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Delivery, Invoice, StreamEvent, Subscription
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, delivery, stream
from billing.services.context import Context
from tasks.config import CHARGE_INVOICES, DELIVER_EVENTS, EVENTS, QUEUE_NAMES
from tasks.testing import CeleryProcess, private_redis_db, process_env, worker
from tests.receiver import Receiver

pytestmark = [pytest.mark.celery, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

QUEUE = "someapp.events"
TASK = "someapp.on_billing_event"

# Another team's consumer. It knows the queue, the task name and the event's shape, nothing else: it records each
# event it is given, in the order it runs them (one at a time: --pool solo), and that it never saw our code.
CONSUMER = textwrap.dedent(
    """
    import json, os, sys
    from celery import Celery

    app = Celery("someapp", broker=os.environ["SOMEAPP_BROKER"])
    app.conf.accept_content = ["json"]

    @app.task(name="someapp.on_billing_event")
    def on_billing_event(event):
        foreign = sorted(m for m in sys.modules if m.split(".")[0] in ("billing", "tasks"))
        with open(os.environ["SOMEAPP_OUT"], "a") as out:
            out.write(json.dumps({"event": event, "foreign_modules": foreign}) + "\\n")
    """
)


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture
def ctx(pg_url: str, sandbox: Any) -> Iterator[Context]:
    migrate.upgrade(pg_url)
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    context = build_context(
        Settings(database_url=pg_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY),
        gateway=gateway,
    )  # no publisher: the test process enqueues nothing, beat and the worker do the billing
    yield context
    gateway.close()
    context.sessions.kw["bind"].dispose()


def consumed(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_bare_celery_app_receives_every_event_in_order_with_the_webhooks_body(
    ctx: Context, pg_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    # Given subscriptions two months behind (three periods due each, so three invoice.paid in a row) and one
    # starting now, a webhook endpoint and the other app's Celery endpoint
    plan_id = catalog.create_plan(ctx, code="monthly", name="Monthly", amount=Money.from_major("45000", "COP"))
    now = ctx.clock.now()
    for n, number in enumerate(("4111111111111111", "4242424242424242", "5500000000000004", "378282246310005")):
        customer = catalog.create_customer(ctx, email=f"c{n}@example.com", first_name=f"C{n}")
        token = ctx.gateway.tokenize_card(number=number, exp_month=12, exp_year=2031, holder_name=f"C{n}")
        catalog.attach_card(ctx, customer_id=customer, token=token)
        subscription = catalog.subscribe(ctx, customer_id=customer, plan_id=plan_id)
        if n < 3:  # backdated as after downtime (subscribe refuses a past anchor)
            anchor = now - timedelta(days=64)
            with ctx.unit_of_work() as session:
                session.execute(
                    update(Subscription)
                    .where(Subscription.id == subscription)
                    .values(anchor_at=anchor, next_billing_at=anchor)
                )
    secret = delivery.new_secret()
    receiver = Receiver(secret).start()
    delivery.add_endpoint(ctx, receiver.url, secret=secret)
    delivery.add_endpoint(ctx, f"celery://{QUEUE}/{TASK}")

    out = tmp_path / "someapp-events.jsonl"
    (tmp_path / "someapp.py").write_text(CONSUMER)
    consumer_env = process_env({"SOMEAPP_BROKER": redis_db_url, "SOMEAPP_OUT": str(out)})
    consumer_env["PYTHONPATH"] = str(tmp_path)  # its own module only
    consumer = CeleryProcess(
        [
            "worker",
            "-Q",
            QUEUE,
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "-n",
            "someapp@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        consumer_env,
        tmp_path / "someapp.log",
        cwd=tmp_path,
        app="someapp",
    )
    billing_env = process_env(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            "BILLING_BEAT_OPEN_SECONDS": "1",
            "BILLING_BEAT_EVENTS_SECONDS": "1",
            "BILLING_BEAT_OUTBOX_SECONDS": "1",
            "BILLING_OUTBOX_MIN_AGE_SECONDS": "1",
        }
    )
    # The deployment docker-compose.yml runs: charging workers on every queue but billing.events, and a worker
    # of its own on billing.events for the delivery loop.
    billing_worker = worker(billing_env, tmp_path / "worker.log", "-Q", ",".join(q for q in QUEUE_NAMES if q != EVENTS))
    events_worker = worker(billing_env, tmp_path / "events.log", "-Q", EVENTS)
    beat = CeleryProcess(
        ["beat", "--loglevel", "INFO", "-s", str(tmp_path / "beat-schedule")], billing_env, tmp_path / "beat.log"
    )
    try:
        consumer.start().wait_for_log(r"ready\.", 60)
        billing_worker.start().wait_for_log(r"ready\.", 60)
        events_worker.start().wait_for_log(r"ready\.", 60)
        beat.start()

        # When billing runs (beat opens the ten invoices, the worker charges them) and delivers its events
        def done() -> bool:
            with ctx.sessions() as session:
                paid = session.execute(select(func.count()).where(Invoice.state == "paid")).scalar_one()
                pending = session.execute(select(func.count()).where(Delivery.state == "pending")).scalar_one()
            return paid == 10 and pending == 0 and not stream.unsequenced(ctx) and len(consumed(out)) >= 10

        deadline = time.monotonic() + 90
        while not done():
            assert time.monotonic() < deadline, (
                f"billing or delivery did not finish:\nworker:\n{billing_worker.log_text()[-3000:]}\n"
                f"events worker:\n{events_worker.log_text()[-2000:]}\n"
                f"someapp:\n{consumer.log_text()[-2000:]}"
            )
            time.sleep(0.3)
    finally:
        beat.stop()
        billing_worker.stop()
        events_worker.stop()
        consumer.stop()
        receiver.stop()

    # Then the delivery loop ran only in the events worker, and billing only in the charging worker (Celery
    # logs "Task NAME[id] received"; the banner lists every task's name without the bracket)
    assert f"Task {DELIVER_EVENTS}[" in events_worker.log_text()
    assert f"Task {DELIVER_EVENTS}[" not in billing_worker.log_text()
    assert f"Task {CHARGE_INVOICES}[" in billing_worker.log_text()
    assert f"Task {CHARGE_INVOICES}[" not in events_worker.log_text()
    # And the other app got every event, never imported our code, and each subscription's events in order
    with ctx.sessions() as session:
        events = list(session.execute(select(StreamEvent).order_by(StreamEvent.stream_offset)).scalars())
    records = consumed(out)
    assert all(r["foreign_modules"] == [] for r in records), records[0]["foreign_modules"]
    bodies = [r["event"] for r in records]
    assert {b["id"] for b in bodies} == {e.event_id for e in events}
    assert sum(1 for e in events if e.type == "invoice.paid") == 10
    per_subscription = Counter(e.subscription_id for e in events if e.subscription_id is not None)
    first_seqs: dict[int, list[int]] = defaultdict(list)
    first_offsets: dict[int, list[int]] = defaultdict(list)  # events without a subscription, per customer
    seen: set[str] = set()
    for body in bodies:
        if body["id"] not in seen:
            if body.get("subscription_id") is not None:
                first_seqs[body["subscription_id"]].append(body["subscription_seq"])
            else:
                first_offsets[body["data"].get("customer_id")].append(body["offset"])
        seen.add(body["id"])
    assert sorted(len(seqs) for seqs in first_seqs.values()) == sorted(per_subscription.values())
    assert min(per_subscription.values()) >= 1 and max(per_subscription.values()) >= 3
    for seqs in first_seqs.values():
        assert seqs == list(range(1, len(seqs) + 1)), first_seqs
    for offsets in first_offsets.values():
        assert offsets == sorted(offsets), first_offsets

    # And the kwarg `event` is exactly the webhook's body (and what the stream holds)
    webhook = {r.webhook_id: r.body for r in receiver.acknowledged()}
    assert receiver.bad_signatures == 0
    stored = {e.event_id: json.loads(stream.encode(e)) for e in events}
    for body in bodies:
        assert body == webhook[body["id"]] == stored[body["id"]]
    paid = next(b for b in bodies if b["type"] == "invoice.paid")
    assert paid["data"]["currency"] == "COP" and paid["data"]["invoice_id"] > 0
