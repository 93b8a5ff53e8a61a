"""The event stream's core: events numbered after commit, delivered in order per subscription to a real HTTP
receiver that verifies every signature, retried with backoff, replayed on request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Delivery, Endpoint, StreamEvent
from billing.services import delivery, stream
from billing.services.context import Context
from billing.services.errors import InvalidRequest
from billing.webhooks import WebhookSender
from tests.fakes import FakeGateway
from tests.receiver import Receiver

SECRET = delivery.new_secret()


def make_ctx(url: str) -> Context:
    migrate.upgrade(url)
    return build_context(
        Settings(database_url=url),
        gateway=FakeGateway(),
        clock=TestClock(datetime.now(UTC)),  # type: ignore[arg-type]
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def ctx(request: pytest.FixtureRequest) -> Iterator[Context]:
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    context = make_ctx(url)
    yield context
    context.sessions.kw["bind"].dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET).start()
    yield server
    server.stop()


def emit(ctx: Context, type_: str, **fields: Any) -> None:
    with ctx.unit_of_work() as session:
        stream.emit(session, ctx.clock.now(), type_, **fields)


def numbered(ctx: Context) -> list[StreamEvent]:
    with ctx.sessions() as session:
        return stream.events_after(session, 0, limit=1000)


def drain(ctx: Context, sender: WebhookSender, passes: int = 20) -> None:
    for _ in range(passes):
        done = delivery.deliver_due(ctx, sender)
        if done["delivered"] + done["failed"] == 0 and not stream.unsequenced(ctx):
            return


def test_an_event_exists_exactly_when_its_transaction_committed(ctx: Context) -> None:
    with pytest.raises(RuntimeError), ctx.unit_of_work() as session:
        stream.emit(session, ctx.clock.now(), "invoice.paid", subscription_id=1, invoice_id=1)
        raise RuntimeError("the state change failed")
    emit(ctx, "invoice.paid", subscription_id=1, invoice_id=2)
    emit(ctx, "customer.created", customer_id=9)
    emit(ctx, "invoice.paid", subscription_id=1, invoice_id=3)
    assert stream.sequence(ctx) == 3
    events = numbered(ctx)
    assert [e.stream_offset for e in events] == [1, 2, 3]
    assert [(e.subscription_id, e.subscription_seq) for e in events] == [(1, 1), (None, None), (1, 2)]
    assert [e.data.get("invoice_id") for e in events] == [2, None, 3]
    assert len({e.event_id for e in events}) == 3


def test_an_event_that_commits_late_gets_an_offset_after_those_already_read(pg_url: str) -> None:
    """A transaction that wrote its event first but commits last is numbered after the events a consumer has
    already read, never with a lower offset it would skip."""
    ctx = make_ctx(pg_url)
    try:
        written, release = threading.Event(), threading.Event()

        def slow_writer() -> None:
            with ctx.unit_of_work() as session:
                stream.emit(session, ctx.clock.now(), "invoice.paid", subscription_id=7)
                session.flush()  # its row (and id) exist, uncommitted
                written.set()
                release.wait(10)

        thread = threading.Thread(target=slow_writer)
        thread.start()
        assert written.wait(10)
        emit(ctx, "invoice.paid", subscription_id=8)  # a higher id, committed first
        assert stream.sequence(ctx) == 1
        seen = numbered(ctx)
        assert [e.subscription_id for e in seen] == [8]
        release.set()
        thread.join(10)
        assert stream.sequence(ctx) == 1
        with ctx.sessions() as session:
            later = stream.events_after(session, seen[-1].stream_offset or 0)
        assert [(e.subscription_id, e.stream_offset, e.subscription_seq) for e in later] == [(7, 2, 1)]
    finally:
        ctx.sessions.kw["bind"].dispose()


def test_events_reach_a_webhook_signed_and_in_order_per_subscription(ctx: Context, receiver: Receiver) -> None:
    delivery.add_endpoint(ctx, receiver.url, secret=SECRET)
    failed_once: set[str] = set()

    def decide(body: dict[str, Any], attempt: int) -> int:
        if body["subscription_id"] == 1 and body["subscription_seq"] == 1 and attempt == 1:
            failed_once.add(body["id"])
            return 500
        return 200

    receiver.decide = decide
    for seq in range(3):
        emit(ctx, "invoice.paid", subscription_id=1, invoice_id=10 + seq)
        emit(ctx, "invoice.paid", subscription_id=2, invoice_id=20 + seq)
    sender = WebhookSender()
    drain(ctx, sender)
    # Subscription 2 went out whole; subscription 1 waits behind its first event, which failed once.
    got = [(r.body["subscription_id"], r.body["subscription_seq"]) for r in receiver.acknowledged()]
    assert got == [(2, 1), (2, 2), (2, 3)]
    assert receiver.bad_signatures == 0
    ctx.clock.advance(timedelta(seconds=10))  # past the first retry's backoff (5 s +- 20 %)
    drain(ctx, sender)
    got = [(r.body["subscription_id"], r.body["subscription_seq"]) for r in receiver.acknowledged()]
    assert got[3:] == [(1, 1), (1, 2), (1, 3)]
    assert all(r.verified for r in receiver.received)
    [retried] = failed_once
    assert [r.status for r in receiver.received if r.webhook_id == retried] == [500, 200]  # same webhook-id


def test_during_a_secret_rotation_receivers_with_either_secret_verify(ctx: Context, receiver: Receiver) -> None:
    endpoint = delivery.add_endpoint(ctx, receiver.url, secret=SECRET)
    new = delivery.rotate_secret(ctx, endpoint.endpoint_id)
    emit(ctx, "invoice.paid", subscription_id=1)
    drain(ctx, WebhookSender())
    assert receiver.acknowledged()[0].verified  # the receiver still knows only the old secret
    with Receiver(new).start() as upgraded:
        delivery.remove_endpoint(ctx, endpoint.endpoint_id)
        second = delivery.add_endpoint(ctx, upgraded.url, secret=SECRET)
        delivery.rotate_secret(ctx, second.endpoint_id, new)
        emit(ctx, "invoice.paid", subscription_id=1)
        drain(ctx, WebhookSender())
        assert upgraded.acknowledged()[0].verified
    delivery.retire_old_secrets(ctx, second.endpoint_id)
    with ctx.sessions() as session:
        assert session.get_one(Endpoint, second.endpoint_id).secret == new


def test_replay_sends_delivered_events_again_in_order(ctx: Context, receiver: Receiver) -> None:
    endpoint = delivery.add_endpoint(ctx, receiver.url, secret=SECRET)
    for n in range(3):
        emit(ctx, "invoice.paid", subscription_id=1, invoice_id=n)
    sender = WebhookSender()
    drain(ctx, sender)
    assert len(receiver.acknowledged()) == 3
    assert delivery.replay(ctx, endpoint.endpoint_id, from_offset=2) == 2
    drain(ctx, sender)
    offsets = [r.body["offset"] for r in receiver.acknowledged()]
    assert offsets == [1, 2, 3, 2, 3]


def test_an_endpoint_that_keeps_failing_is_marked_failing_and_keeps_its_backlog(
    ctx: Context, receiver: Receiver
) -> None:
    endpoint = delivery.add_endpoint(ctx, receiver.url, secret=SECRET)
    receiver.decide = lambda body, attempt: 503
    emit(ctx, "invoice.paid", subscription_id=1)
    sender = WebhookSender()
    for _ in range(delivery.FAILING_AFTER):
        drain(ctx, sender)
        ctx.clock.advance(timedelta(days=1))
    [row] = delivery.list_endpoints(ctx)
    assert row["status"] == "failing" and row["pending"] == 1
    receiver.decide = None
    drain(ctx, sender)
    [row] = delivery.list_endpoints(ctx)
    assert row["status"] == "active" and row["pending"] == 0
    assert endpoint.secret == SECRET


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/hooks", "must use https unless it points at a loopback address"),
        ("ftp://127.0.0.1/x", "must be http(s)://"),
        ("https://user:pw@example.com/", "must not carry credentials"),
        ("celery://billing.events", "celery://QUEUE/TASK_NAME"),
    ],
)
def test_bad_endpoint_urls_are_refused(ctx: Context, url: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        delivery.add_endpoint(ctx, url)
    with ctx.sessions() as session:
        assert session.execute(select(Endpoint)).first() is None


def test_a_redirect_is_not_followed(ctx: Context, receiver: Receiver) -> None:
    delivery.add_endpoint(ctx, receiver.url, secret=SECRET)
    receiver.decide = lambda body, attempt: 302
    emit(ctx, "invoice.paid", subscription_id=1)
    drain(ctx, WebhookSender())
    with ctx.sessions() as session:
        [row] = session.execute(select(Delivery)).scalars()
        assert row.state == "pending" and row.last_error == "HTTP 302"


def test_a_claimed_head_is_leased_and_claimed_again_only_after_its_lease(ctx: Context) -> None:
    """A pass that died after its claim (nothing recorded) holds the head for CLAIM_LEASE, no longer; a failed
    attempt frees it at once for its retry time (the lease column, not next_attempt_at, marks a claim)."""
    delivery.add_endpoint(ctx, "http://127.0.0.1:9/hooks", secret=SECRET)
    emit(ctx, "invoice.opened", subscription_id=1)
    emit(ctx, "invoice.paid", subscription_id=1)
    stream.sequence(ctx)
    [first] = delivery.claim_heads(ctx)
    assert first.attempts == 1
    assert delivery.claim_heads(ctx) == []  # leased, and the next event of its key is not a head
    ctx.clock.advance(delivery.CLAIM_LEASE - timedelta(seconds=1))
    assert delivery.claim_heads(ctx) == []
    ctx.clock.advance(timedelta(seconds=2))
    [again] = delivery.claim_heads(ctx)
    assert (again.stream_offset, again.attempts) == (first.stream_offset, 2)
    delivery._record(ctx, [(again, "HTTP 503")])
    assert delivery.claim_heads(ctx) == []  # not due before its retry delay
    ctx.clock.advance(timedelta(seconds=delivery.RETRY_SCHEDULE[1] * 1.2 + 1))  # past the jitter's upper bound
    [retry] = delivery.claim_heads(ctx)
    assert (retry.stream_offset, retry.attempts) == (first.stream_offset, 3)
    delivery._record(ctx, [(retry, None)])
    [paid] = delivery.claim_heads(ctx)  # delivered: the next event of the key is the head
    assert paid.stream_offset > first.stream_offset and paid.attempts == 1
    with ctx.sessions() as session:
        leases = dict(session.execute(select(Delivery.stream_offset, Delivery.claimed_until)).all())
    assert leases[first.stream_offset] is None and leases[paid.stream_offset] is not None
