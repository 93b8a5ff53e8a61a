"""Beat's periodic tasks (queue `billing.scheduler`). All are idempotent and safe to run twice at once; a lease
per task in the `control` table makes a second beat's duplicate tick a cheap no-op (see tasks.leases)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from celery import Task
from kombu.exceptions import ChannelError

from billing.db import control
from billing.services import commands, delivery, invoicing, metrics, notices, pause, reconcile, stream, voids
from billing.services.context import Context
from billing.services.outbox import relay_outbox as relay_outbox_service
from tasks import config as names
from tasks import leases
from tasks.app import app, runtime, task

log = logging.getLogger("billing.tasks")

OPEN_BATCH = 500
REFUND_BATCH = 500


def _lease_ttl(name: str) -> timedelta:
    # A little under the interval: the same beat's next tick always finds the lease free.
    return timedelta(seconds=runtime.task_settings.beat_interval(name) * 0.8)


def _periodic(name: str) -> Callable[[Callable[[Context], dict[str, Any]]], Task]:
    def register(body: Callable[[Context], dict[str, Any]]) -> Task:
        def run(self: Task) -> dict[str, Any]:
            ctx = runtime.context()
            if not leases.acquire(ctx, name, _lease_ttl(name), holder=str(self.request.id)):
                return {"skipped": "lease held: another run of this task started less than an interval ago"}
            return body(ctx)

        run.__doc__ = body.__doc__
        run.__name__ = body.__name__
        run.__qualname__ = body.__qualname__
        return task(name, bind=True)(run)

    return register


def _time_budget_seconds() -> float:
    return runtime.task_settings.soft_time_limit_seconds / 2


def _send(name: str, **kwargs: Any) -> None:
    app.send_task(name, kwargs=kwargs, queue=names.ROUTES[name])


def queue_depth(queue: str) -> int | None:
    """Messages waiting in `queue` (not counting those workers hold), or None when the broker cannot say."""
    try:
        with app.connection_for_read() as connection:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
    except ChannelError:  # a Redis queue with no messages does not exist
        return 0
    except Exception as exc:
        log.info("queue depth of %s unknown: %s", queue, type(exc).__name__)
        return None


@_periodic(names.OPEN_DUE_INVOICES)
def open_due_invoices(ctx: Context) -> dict[str, Any]:
    """Resume the paused subscriptions whose resume date has come, then open the invoices of every due
    subscription period (catching up after downtime); their charges are published after each commit through the
    outbox."""
    resumed = commands.resume_due(ctx)
    opened, passes = 0, 0
    deadline = time.monotonic() + _time_budget_seconds()
    while True:
        count = invoicing.open_due_invoices(ctx, limit=OPEN_BATCH, batch_size=runtime.task_settings.charge_batch_size)
        opened += count
        passes += 1
        if count == 0 or time.monotonic() > deadline:
            break
    report: dict[str, Any] = {"opened": opened, "passes": passes, "resumed": resumed}
    # The advance notices have a day's granularity: a scan a minute is plenty, whatever the beat interval.
    if leases.acquire(ctx, "billing.notices", NOTICE_EVERY, holder=f"open-{time.time_ns()}"):
        report["notices"] = notices.send_notices(ctx)
    return report


NOTICE_EVERY = timedelta(seconds=60)


@_periodic(names.ENQUEUE_DUE_INVOICES)
def enqueue_due_invoices(ctx: Context) -> dict[str, Any]:
    """The sweep: re-enqueue the charge of open invoices whose time has come and gone (dunning retries, new
    cards, lost messages), in billing.charge_invoices batches. Skipped while billing is paused or the charges
    queue already holds a sweep's worth of messages."""
    settings = runtime.task_settings
    size = settings.charge_batch_size
    with ctx.sessions() as session:
        if control.get_pause(session) is not None:
            return {"enqueued": 0, "skipped": "billing paused"}
    depth = queue_depth(names.CHARGES)
    if depth is not None and depth >= -(-settings.sweep_limit // size):
        return {"enqueued": 0, "skipped": "charges queue backlog", "queue_depth": depth}
    with ctx.sessions() as session:
        ids = reconcile.due_invoice_ids(session, ctx.clock.now() - settings.sweep_grace, settings.sweep_limit)
    if size <= 1:
        for invoice_id in ids:
            _send(names.CHARGE_INVOICE, invoice_id=invoice_id)
    else:
        for start in range(0, len(ids), size):
            _send(names.CHARGE_INVOICES, invoice_ids=ids[start : start + size])
    return {"enqueued": len(ids), "queue_depth": depth}


@_periodic(names.RUN_REFUNDS)
def run_refunds(ctx: Context) -> dict[str, Any]:
    """Expire requested refunds whose void window has passed (Tpaga not called) and enqueue the others, with
    the unknown ones whose next try has come."""
    expired = voids.expire_refunds(ctx)
    with ctx.sessions() as session:
        ids = voids.due_refund_ids(session, ctx.clock.now(), limit=REFUND_BATCH)
    for refund_id in ids:
        _send(names.EXECUTE_REFUND, refund_id=refund_id)
    return {"expired": expired, "enqueued": len(ids)}


@_periodic(names.RECONCILE)
def reconcile_attempts(ctx: Context) -> dict[str, Any]:
    """Expire attempts whose worker died, settle unknown ones Tpaga can tell us about, and resume billing
    paused for bad credentials once they work again; and fold the metric deltas (the exporter folds before each
    scrape too: this keeps them from piling up where none runs)."""
    # The probe first: a lookup that fails must not keep a paused billing from resuming.
    resumed = pause.probe_gateway(ctx)
    stuck = reconcile.expire_stuck_attempts(ctx)
    lookups = reconcile.resolve_unknown_by_lookup(ctx)
    folded = metrics.fold_deltas(ctx)
    return {"stuck": stuck, "lookups": lookups, "resumed": resumed, "metric_deltas_folded": folded}


@_periodic(names.RELAY_OUTBOX)
def relay_outbox(ctx: Context) -> dict[str, Any]:
    """Publish task intents whose after-commit publish did not happen."""
    min_age = timedelta(seconds=runtime.task_settings.outbox_min_age_seconds)
    return relay_outbox_service(ctx, min_age=min_age)


_sender: Any = None


def _webhook_sender() -> Any:
    """One sender per process (its HTTP sessions are per thread)."""
    global _sender
    if _sender is None:
        from billing.webhooks import WebhookSender

        def publish(task_name: str, queue: str, kwargs: dict[str, Any]) -> None:
            app.send_task(task_name, kwargs=kwargs, queue=queue)

        _sender = WebhookSender(publish=publish)
    return _sender


DELIVERY_LOOP_SECONDS = 20.0
# Renewed after every pass: a loop whose worker was killed blocks the next one for this long at most.
DELIVERY_LEASE = timedelta(seconds=15)
# Passes that run at once: while one waits on its webhooks, the other numbers, claims and records (a pass alone
# spent about a third of its time in statements with nothing in flight). Safe to overlap: heads are claimed
# with SKIP LOCKED and a lease, and a second sequencer skips its turn.
OVERLAPPING_PASSES = 2


@task(names.DELIVER_EVENTS, bind=True)
def deliver_events(self: Task) -> dict[str, Any]:
    """Number the events committed since the last pass and deliver what is due, pass after pass while there is
    work (up to DELIVERY_LOOP_SECONDS); at most once an hour, forget events past the retention.

    One loop at a time (a lease renewed after each pass and given back when the loop ends, so beat's next tick
    starts the next loop at once); a second beat's tick, or one that finds a loop running, is a no-op. Inside
    the loop OVERLAPPING_PASSES passes run side by side (each with at most BILLING_DELIVERY_THREADS webhooks in
    flight), which is safe: heads are claimed with SKIP LOCKED.
    """
    ctx = runtime.context()
    holder = str(self.request.id)
    if not leases.acquire(ctx, names.DELIVER_EVENTS, DELIVERY_LEASE, holder=holder):
        return {"skipped": "another delivery loop is running"}
    settings = runtime.task_settings
    totals = {"delivered": 0, "failed": 0, "passes": 0}
    deadline = time.monotonic() + DELIVERY_LOOP_SECONDS
    sender = _webhook_sender()
    lock = threading.Lock()
    working = {"passes": OVERLAPPING_PASSES}

    def passes() -> None:
        idle = False
        while time.monotonic() <= deadline:
            done = delivery.deliver_due(ctx, sender, threads=settings.delivery_threads)
            leases.renew(ctx, names.DELIVER_EVENTS, holder)
            with lock:
                totals["passes"] += 1
                totals["delivered"] += done["delivered"]
                totals["failed"] += done["failed"]
                if done["delivered"] + done["failed"] == 0 and not idle:
                    idle, working["passes"] = True, working["passes"] - 1
                elif done["delivered"] + done["failed"] and idle:
                    idle, working["passes"] = False, working["passes"] + 1
                others_working = working["passes"] > 0
            if idle:
                # Nothing due for this pass: the loop ends when no pass has work and every event is numbered
                # (another sequencer may hold the counter: its events are numbered in a moment). While the other
                # pass sends, the heads its acknowledgements free are this pass's work.
                if not others_working and not stream.unsequenced(ctx):
                    return
                time.sleep(0.05)

    try:
        with ThreadPoolExecutor(OVERLAPPING_PASSES, thread_name_prefix="delivery-pass") as pool:
            # The first exception (a database gone) ends the loop as it did with one pass; beat starts the next.
            for future in [pool.submit(passes) for _ in range(OVERLAPPING_PASSES)]:
                future.result()
        if leases.acquire(ctx, "stream.purge", timedelta(hours=1), holder=holder):
            totals["purged"] = delivery.purge(ctx, retention=timedelta(days=settings.event_retention_days))
    finally:
        leases.release(ctx, names.DELIVER_EVENTS, holder)
    return totals
