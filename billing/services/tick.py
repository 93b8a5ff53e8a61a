"""One cycle of all periodic work, in-process (no broker): `billing tick`, cron users, tests and debugging."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select, update

from billing.db.models import OutboxMessage
from billing.services import commands, notices, voids
from billing.services.charging import charge_invoice
from billing.services.context import Context
from billing.services.invoicing import open_due_invoices
from billing.services.pause import probe_gateway
from billing.services.reconcile import due_invoice_ids, expire_stuck_attempts, resolve_unknown_by_lookup

log = logging.getLogger("billing.tick")


def charge_due(ctx: Context, *, threads: int = 8, limit: int = 1000) -> dict[str, int]:
    """Charge every due invoice (bounded per pass), several in flight at once."""
    totals: dict[str, int] = {}
    with ctx.sessions() as session:
        ids = due_invoice_ids(session, ctx.clock.now(), limit)
    if not ids:
        return totals
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for outcome in pool.map(lambda i: charge_invoice(ctx, i).outcome, ids):
            totals[outcome] = totals.get(outcome, 0) + 1
    return totals


def mark_outbox_done(ctx: Context) -> int:
    """Tick does the outbox's work through its scans; mark intents as delivered so the relay stays quiet."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        ids = list(session.execute(select(OutboxMessage.id).where(OutboxMessage.published_at.is_(None))).scalars())
        if ids:
            session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(published_at=now))
    return len(ids)


def run_tick(ctx: Context, *, threads: int = 8) -> dict[str, Any]:
    """Open due invoices, send the stream's advance notices, charge, retry dunning, execute and expire refunds,
    reconcile."""
    report: dict[str, Any] = {"opened": 0, "charges": {}, "refunds": {}}
    report["resumed"] = probe_gateway(ctx)
    report["subscriptions_resumed"] = commands.resume_due(ctx)
    while True:
        opened = open_due_invoices(ctx)
        report["opened"] += opened
        if not opened:
            break
    report["notices"] = notices.send_notices(ctx)
    report["reconciled"] = expire_stuck_attempts(ctx)
    report["lookups"] = resolve_unknown_by_lookup(ctx)
    for _ in range(100):  # each pass is bounded; a few passes drain a large backlog
        done = charge_due(ctx, threads=threads)
        for key, value in done.items():
            report["charges"][key] = report["charges"].get(key, 0) + value
        if not done or set(done) <= {"paused"}:
            break
    report["refunds_expired"] = voids.expire_refunds(ctx)
    with ctx.sessions() as session:
        refund_ids = voids.due_refund_ids(session, ctx.clock.now())
    for refund_id in refund_ids:
        state = voids.execute_refund(ctx, refund_id).state
        report["refunds"][state] = report["refunds"].get(state, 0) + 1
    mark_outbox_done(ctx)
    return report
