"""The stream's commit-order property on PostgreSQL with concurrent writers (issue 14, "Proof").

Writer threads commit events in many small transactions, some held open for a random moment after their rows
exist, so that commit order differs from id order. Meanwhile two sequencers number what has committed and a
consumer polls `events_after(last offset seen)`, as an app tailing the stream would. If offsets followed ids
(a sequence), the consumer would move past an event that commits later with a lower number and never see it.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text

from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Delivery, Endpoint, StreamEvent
from billing.services import delivery, stream
from billing.services.context import Context
from tests.fakes import FakeGateway

pytestmark = [pytest.mark.postgres]

WRITERS = 6
TRANSACTIONS = 120  # per writer
SUBSCRIPTIONS = 12
CUSTOMERS = 4  # events without a subscription


@pytest.fixture
def ctx(pg_url: str) -> Iterator[Context]:
    migrate.upgrade(pg_url)
    context = build_context(
        Settings(database_url=pg_url),
        gateway=FakeGateway(),
        clock=TestClock(datetime.now(UTC)),  # type: ignore[arg-type]
    )
    yield context
    context.sessions.kw["bind"].dispose()


def test_a_consumer_polling_by_offset_sees_every_event_once_while_writers_commit_out_of_id_order(
    ctx: Context,
) -> None:
    written: list[str] = []  # event ids, appended once their transaction committed
    written_lock = threading.Lock()
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)

        return run

    def writer(n: int) -> None:
        rng = random.Random(n)
        for _ in range(TRANSACTIONS):
            rows = []
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.8:
                    rows.append(
                        stream.row(ctx.clock.now(), "invoice.paid", subscription_id=rng.randint(1, SUBSCRIPTIONS))
                    )
                else:
                    rows.append(stream.row(ctx.clock.now(), "customer.updated", customer_id=rng.randint(1, CUSTOMERS)))
            with ctx.unit_of_work() as session:
                stream.emit_many(session, rows)
                if rng.random() < 0.3:
                    # The rows (and their ids) exist, uncommitted, while others commit and are numbered.
                    time.sleep(rng.uniform(0.005, 0.05))
            with written_lock:
                written.extend(r["event_id"] for r in rows)
            # A pause between transactions lets the sequencers catch up with the writers: a late commit only
            # matters when the events after it are numbered (and read) before it commits.
            time.sleep(rng.uniform(0, 0.004))

    sequencer_stop = threading.Event()

    def sequencer(n: int) -> None:
        rng = random.Random(100 + n)
        while not sequencer_stop.is_set():
            # Small batches: many numbering transactions, interleaved with the writers' commits.
            if stream.sequence(ctx, limit=rng.randint(1, 50)) == 0:
                time.sleep(0.002)

    seen: list[StreamEvent] = []

    def consumer() -> None:
        last = 0
        idle_after_stop = 0
        while idle_after_stop < 3:
            with ctx.sessions() as session:
                batch = stream.events_after(session, last, limit=50)
                session.expunge_all()
            if batch:
                seen.extend(batch)
                last = batch[-1].stream_offset or last
                idle_after_stop = 0
            elif sequencer_stop.is_set():
                idle_after_stop += 1
            else:
                time.sleep(0.002)

    writers = [threading.Thread(target=guarded(lambda n=n: writer(n))) for n in range(WRITERS)]
    sequencers = [threading.Thread(target=guarded(lambda n=n: sequencer(n))) for n in range(2)]
    reader = threading.Thread(target=guarded(consumer))
    for thread in [*writers, *sequencers, reader]:
        thread.start()
    for thread in writers:
        thread.join(120)
    # Everything has committed: let the sequencers number the rest, then stop them and let the reader catch up.
    deadline = time.monotonic() + 60
    while stream.unsequenced(ctx) and time.monotonic() < deadline:
        time.sleep(0.01)
    sequencer_stop.set()
    for thread in [*sequencers, reader]:
        thread.join(60)
    assert not errors, errors
    assert not stream.unsequenced(ctx)

    # The consumer saw every committed event exactly once, at offsets 1..N in order, without a gap.
    assert len(written) >= WRITERS * TRANSACTIONS
    seen_ids = [e.event_id for e in seen]
    assert len(seen_ids) == len(set(seen_ids)), "an event was read twice"
    assert set(seen_ids) == set(written), f"{len(set(written) - set(seen_ids))} event(s) never seen"
    assert [e.stream_offset for e in seen] == list(range(1, len(written) + 1))
    # Per subscription, subscription_seq is 1..n in offset order; events without one carry none.
    seqs: dict[int, list[int | None]] = defaultdict(list)
    for event in seen:
        if event.subscription_id is None:
            assert event.subscription_seq is None
        else:
            seqs[event.subscription_id].append(event.subscription_seq)
    assert len(seqs) == SUBSCRIPTIONS
    for subscription_id, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), (subscription_id, got)

    # The run did exercise the property: some events committed after events with higher ids, so their
    # offsets are not in id order (numbering by id would have made the consumer skip them).
    ids_in_offset_order = [e.id for e in seen]
    inversions = sum(1 for a, b in itertools.pairwise(ids_in_offset_order) if a > b)
    assert inversions > 0, "every transaction committed in id order: the test proved nothing"
    with ctx.sessions() as session:
        assert session.execute(select(func.count()).select_from(StreamEvent)).scalar_one() == len(written)


# --- endpoints added or removed while a sequencer fans out ----------------------------------------------------


class FanOutHeld:
    """Holds a sequencer's transaction open right after its fan-out (the numbers and the deliveries for the
    endpoints it saw are written, not committed) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.release = threading.Event(), threading.Event()
        original = stream._fan_out

        def held(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            self.reached.set()
            self.release.wait(30)

        monkeypatch.setattr(stream, "_fan_out", held)


def emit_committed(ctx: Context, count: int) -> None:
    for n in range(count):
        with ctx.unit_of_work() as session:
            stream.emit(session, ctx.clock.now(), "invoice.paid", subscription_id=1, invoice_id=n)


def while_a_sequencer_fans_out(ctx: Context, pg_url: str, monkeypatch: pytest.MonkeyPatch, change: Any) -> Any:
    """Run `change(other_ctx)` while a sequencer's transaction is held after its fan-out; return its result once
    both have finished. The change runs on its own connection; it may wait for the sequencer (a lock) or not."""
    tag = f"evchange{uuid.uuid4().hex[:8]}"
    other = build_context(
        Settings(database_url=f"{pg_url}&application_name={tag}"),
        gateway=FakeGateway(),
        clock=ctx.clock,
    )
    hold = FanOutHeld(monkeypatch)
    sequencer = threading.Thread(target=stream.sequence, args=(ctx,))
    sequencer.start()
    assert hold.reached.wait(30)
    result: dict[str, Any] = {}
    changer = threading.Thread(target=lambda: result.setdefault("value", change(other)))
    changer.start()
    try:
        # Until the change has finished, or waits for a lock the sequencer holds.
        while changer.is_alive():
            with ctx.sessions() as session:
                waiting = session.execute(
                    text(
                        "select count(*) from pg_stat_activity where application_name = :tag "
                        "and wait_event_type = 'Lock'"
                    ),
                    {"tag": tag},
                ).scalar_one()
            if waiting:
                break
            time.sleep(0.01)
    finally:
        hold.release.set()
        sequencer.join(30)
        changer.join(30)
        monkeypatch.undo()
        other.sessions.kw["bind"].dispose()
    return result["value"]


def test_an_endpoint_added_while_a_sequencer_fans_out_gets_every_event_after_its_from_offset(
    ctx: Context, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three events numbered and three more committed, a sequencer numbering those three right now
    emit_committed(ctx, 3)
    assert stream.sequence(ctx) == 3
    emit_committed(ctx, 3)
    # When an endpoint is added at that moment
    added = while_a_sequencer_fans_out(
        ctx, pg_url, monkeypatch, lambda other: delivery.add_endpoint(other, "http://127.0.0.1:9/hooks")
    )
    emit_committed(ctx, 1)
    stream.sequence(ctx)
    # Then it is queued exactly the events after its from_offset: none is skipped in between
    with ctx.sessions() as session:
        endpoint = session.get_one(Endpoint, added.endpoint_id)
        queued = set(
            session.execute(select(Delivery.stream_offset).where(Delivery.endpoint_id == endpoint.id)).scalars()
        )
    assert queued == set(range(endpoint.from_offset + 1, 8)), (endpoint.from_offset, sorted(queued))


def test_an_endpoint_removed_while_a_sequencer_fans_out_is_left_nothing_to_send(
    ctx: Context, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an endpoint and committed events a sequencer is numbering (and fanning out to it) right now
    endpoint = delivery.add_endpoint(ctx, "http://127.0.0.1:9/hooks")
    emit_committed(ctx, 3)
    # When the endpoint is removed at that moment
    while_a_sequencer_fans_out(
        ctx, pg_url, monkeypatch, lambda other: delivery.remove_endpoint(other, endpoint.endpoint_id)
    )
    # Then nothing is left pending for it (it would be retried for as long as events are kept, and keep them)
    with ctx.sessions() as session:
        pending = session.execute(
            select(func.count()).where(Delivery.endpoint_id == endpoint.endpoint_id, Delivery.state == "pending")
        ).scalar_one()
    assert pending == 0
