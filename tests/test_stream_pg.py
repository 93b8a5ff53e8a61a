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
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.db.models import StreamEvent
from billing.services import stream
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
