"""The outbox relay: publish task intents whose after-commit publish never happened (crash, broker down)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from billing.db.models import OutboxMessage
from billing.services.context import Context

log = logging.getLogger("billing.outbox")


def relay_outbox(ctx: Context, *, min_age: timedelta = timedelta(seconds=5), limit: int = 500) -> dict[str, int]:
    """Publish unpublished intents older than `min_age` (younger ones are still being published after their
    commit) and mark them published. At least once: a crash between publishing and committing publishes again,
    which the idempotent tasks absorb. Stops at the first failure: the broker is down, the next run retries."""
    counts = {"published": 0, "failed": 0}
    if ctx.publisher is None:
        return counts
    now = ctx.clock.now()
    with ctx.sessions() as session, session.begin():
        rows = (
            session.execute(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None), OutboxMessage.created_at <= now - min_age)
                .order_by(OutboxMessage.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            .scalars()
            .all()
        )
        for row in rows:
            row.publish_attempts += 1
            try:
                ctx.publisher.publish(row.task_name, dict(row.kwargs))
            except Exception as exc:
                log.warning("relay of outbox %s (%s) failed: %s", row.id, row.task_name, type(exc).__name__)
                counts["failed"] += 1
                break
            row.published_at = now
            counts["published"] += 1
    return counts
