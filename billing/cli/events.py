"""`billing events list|tail`: the event stream as apps receive it, read from the database.

Both show numbered events only: an event gets its offset from the delivery loop (`billing.deliver_events` on a
worker) shortly after its transaction commits, and that offset is where `--after-offset` and `tail` resume.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from billing.cli.common import (
    ID,
    database_option,
    echo_json,
    echo_table,
    format_time,
    handle_errors,
    json_option,
    load_settings,
)
from billing.cli.webhooks import parse_event_types

TAIL_BATCH = 500


def _types_option(func: Any) -> Any:
    return click.option(
        "--type", "types", default=None, metavar="TYPE,...", help="Only these event types (comma-separated)."
    )(func)


def _subscription_option(func: Any) -> Any:
    return click.option(
        "--subscription", "subscription_id", type=ID, default=None, metavar="ID", help="Only this subscription."
    )(func)


@click.group()
def events() -> None:
    """The outbound event stream (docs/events.md), oldest first, by offset."""


@events.command("list")
@_types_option
@_subscription_option
@click.option("--after-offset", type=click.IntRange(min=0), default=0, metavar="N", help="Events after offset N.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000), help="At most this many.")
@json_option
@database_option
@handle_errors
def list_(
    types: str | None,
    subscription_id: int | None,
    after_offset: int,
    limit: int,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Events after an offset, oldest first; --json prints the bodies endpoints receive."""
    from sqlalchemy import func, select

    from billing.cli.common import session_scope
    from billing.db.models import StreamEvent
    from billing.services import stream

    wanted = parse_event_types(types, "--type")
    with session_scope(load_settings(database_url)) as session:
        rows = stream.events_after(session, after_offset, limit=limit, types=wanted, subscription_id=subscription_id)
        bodies = [stream.body(e) for e in rows]
        waiting = 0
        if not as_json:
            waiting = session.execute(
                select(func.count(StreamEvent.id)).where(StreamEvent.stream_offset.is_(None))
            ).scalar_one()
    if as_json:
        echo_json(bodies)
        return
    echo_table(
        ["offset", "created", "type", "subscription", "seq", "customer", "id"],
        [
            (
                e.stream_offset,
                format_time(e.created_at),
                e.type,
                e.subscription_id,
                e.subscription_seq,
                e.customer_id,
                e.event_id,
            )
            for e in rows
        ],
        empty=f"no events after offset {after_offset}" + (" matching the filters" if wanted or subscription_id else ""),
    )
    if len(rows) == limit:
        click.echo(f"({limit} shown; --after-offset {rows[-1].stream_offset} for the next ones)")
    if waiting:
        click.echo(f"{waiting} committed event(s) wait for their offset (the delivery loop numbers them)")


@events.command("tail")
@click.option("--from-offset", type=click.IntRange(min=1), default=None, metavar="N", help="Start at offset N.")
@_types_option
@_subscription_option
@click.option("--json", "as_json", is_flag=True, help="Print each event's body as one JSON line.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60), help="Seconds per poll.")
@database_option
@handle_errors
def tail(
    from_offset: int | None,
    types: str | None,
    subscription_id: int | None,
    as_json: bool,
    interval: float,
    database_url: str | None,
) -> None:
    """Print new events as they are numbered, like `tail -f` (from the stream's end unless --from-offset)."""
    from billing.db.engine import make_engine, make_session_factory
    from billing.listener import describe
    from billing.services import stream

    wanted = parse_event_types(types, "--type")
    engine = make_engine(load_settings(database_url).database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            cursor = from_offset - 1 if from_offset is not None else stream.last_offset(session)
        click.echo(f"following events after offset {cursor}; Ctrl-C to stop", err=True)
        while True:
            with sessions() as session:
                batch = stream.events_after(
                    session, cursor, limit=TAIL_BATCH, types=wanted, subscription_id=subscription_id
                )
                bodies = [stream.body(e) for e in batch]
            for body in bodies:
                click.echo(json.dumps(body, sort_keys=True) if as_json else f"{body['created_at']}  {describe(body)}")
            if bodies:
                cursor = int(bodies[-1]["offset"])
            if len(bodies) < TAIL_BATCH:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        engine.dispose()
