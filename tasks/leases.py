"""A per-task lease in the `control` table: two beats (or a beat and an operator) running the same periodic
task within one interval do the work once. Good manners only: every periodic service is already safe to run
twice at once (compare-and-set, unique constraints, SKIP LOCKED), so a lost lease costs nothing but time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import IntegrityError

from billing.db.models import Control
from billing.services.context import Context

PREFIX = "lease:"


def acquire(ctx: Context, name: str, ttl: timedelta, holder: str) -> bool:
    """Take the lease `name` for `ttl` unless someone else took it less than `ttl` ago."""
    key = PREFIX + name
    now = ctx.clock.now()
    try:
        with ctx.sessions() as session, session.begin():
            row = session.get(Control, key, with_for_update=True)
            if row is None:
                session.add(Control(key=key, value=holder[:200], updated_at=now))
                return True
            if row.updated_at + ttl > now:
                return False
            row.value = holder[:200]
            row.updated_at = now
            return True
    except IntegrityError:  # a concurrent first acquirer inserted the row
        return False


def release(ctx: Context, name: str, holder: str) -> None:
    """Give the lease back early if `holder` still has it (the next run need not wait out its ttl)."""
    with ctx.sessions() as session, session.begin():
        row = session.get(Control, PREFIX + name, with_for_update=True)
        if row is not None and row.value == holder[:200]:
            row.updated_at = datetime.fromtimestamp(0, UTC)


def renew(ctx: Context, name: str, holder: str) -> bool:
    """Extend the lease from now if `holder` still has it (a long run keeps it while it works)."""
    with ctx.sessions() as session, session.begin():
        row = session.get(Control, PREFIX + name, with_for_update=True)
        if row is None or row.value != holder[:200]:
            return False
        row.updated_at = ctx.clock.now()
        return True
