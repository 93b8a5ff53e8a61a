"""Delivering the stream to endpoints: in order per subscription, retried for days, replayable.

A pass (`deliver_due`) claims the deliveries that may go now: per endpoint and ordering key only the lowest
pending offset (the head), and only when its next attempt is due and no pass holds it. The claim gives the head
a lease (`claimed_until`, in no index: a HOT update) and commits before anything is sent, so a concurrent pass
(a second beat, another worker) skips it and a worker killed mid-send leaves a head that is sent again after the
lease (the same `webhook-id`: at least once, never out of order). An acknowledged head (2xx, or the broker took
the Celery message) is `delivered`, which makes the next event of its key the head.

A failed attempt is retried with exponential backoff and jitter (`RETRY_SCHEDULE`, then every 12 hours, for as
long as the event is kept); after `FAILING_AFTER` failures in a row an endpoint is marked failing with an
ALERT, and its backlog waits for it.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from billing.config import is_loopback_host
from billing.db import bulk
from billing.db.models import Delivery, Endpoint, StreamEvent
from billing.services import events, stream
from billing.services.context import Context
from billing.services.errors import InvalidRequest, NotFound

log = logging.getLogger("billing.delivery")

# Seconds before retry n (1-based); afterwards every 12 hours. The first retry comes within seconds, and the
# whole schedule spans more than 3 days before the 12-hour steps.
RETRY_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 12 * 3600, 12 * 3600, 12 * 3600)
LATER_RETRY_SECONDS = 12 * 3600
FAILING_AFTER = 5
# Longer than one send can take (connect 3.05 s + read 10 s), short enough that a head claimed by a worker that
# was killed goes out again soon.
CLAIM_LEASE = timedelta(seconds=20)
RECORD_GROUP = 50
RECORD_EVERY_SECONDS = 0.1
EVENT_TYPES_MAX = 64
# Heads claimed per pass: a pass's statements cost about the same for 200 or 2,000, so larger passes keep pace
# with billing (the benchmark's 20 ms receiver: 204 events/s for ~500 charges/s with passes of 200; once
# billing is done, 1,000 per ~0.5 s with passes of 1,000 and 64 in flight, 2,000 per ~0.4 s with 2,000 and 256).
# The sequencer numbers as many per pass (stream.SEQUENCE_BATCH): a pass only claims numbered events.
PASS_SIZE = 2000


class DeliveryFailed(Exception):
    """Raised by a sender when the endpoint did not acknowledge; the message says why, without secrets."""


Send = Callable[[Endpoint, StreamEvent], None]


def retry_delay(attempts: int, rng: random.Random | None = None) -> timedelta:
    """The wait after the `attempts`-th failed attempt, with +-20 % jitter."""
    base = RETRY_SCHEDULE[attempts - 1] if 1 <= attempts <= len(RETRY_SCHEDULE) else LATER_RETRY_SECONDS
    jitter = (rng or random).uniform(0.8, 1.2)
    return timedelta(seconds=base * jitter)


# --- endpoints ----------------------------------------------------------------------------------------------


def check_url(url: str) -> str:
    """webhook: http(s) only, https unless loopback; celery://QUEUE/TASK_NAME for in-house consumers."""
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidRequest("the endpoint URL must be a string of at most 2048 characters")
    parts = urlsplit(url)
    if parts.scheme == "celery":
        queue, task = parts.netloc, parts.path.lstrip("/")
        if not queue or not task or "/" in task:
            raise InvalidRequest("a Celery endpoint is celery://QUEUE/TASK_NAME")
        return url
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"the endpoint URL must be http(s)://... or celery://QUEUE/TASK, got {url[:60]!r}")
    if parts.scheme != "https" and not is_loopback_host(parts.hostname):
        raise InvalidRequest("the endpoint URL must use https unless it points at a loopback address")
    if parts.username or parts.password:
        raise InvalidRequest("the endpoint URL must not carry credentials; it is signed with its secret instead")
    return url


def new_secret() -> str:
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_secret(secret: str) -> str:
    import base64
    import binascii

    if not isinstance(secret, str) or not secret.startswith("whsec_"):
        raise InvalidRequest("a webhook secret is whsec_ followed by base64 (at least 24 bytes)")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("a webhook secret is whsec_ followed by base64 (at least 24 bytes)") from None
    if len(raw) < 24:
        raise InvalidRequest("a webhook secret needs at least 24 bytes of randomness")
    return secret


@dataclass(frozen=True)
class NewEndpoint:
    endpoint_id: int
    url: str
    secret: str | None  # shown once, at creation


def add_endpoint(
    ctx: Context, url: str, *, event_types: Sequence[str] | None = None, secret: str | None = None
) -> NewEndpoint:
    """Register an endpoint; it receives the events numbered from now on (`replay` sends older ones)."""
    url = check_url(url)
    kind = "celery" if url.startswith("celery://") else "webhook"
    if event_types is not None:
        event_types = sorted(set(event_types))
        if not 1 <= len(event_types) <= EVENT_TYPES_MAX or not all(
            isinstance(t, str) and 1 <= len(t) <= 48 for t in event_types
        ):
            raise InvalidRequest(f"--events takes 1 to {EVENT_TYPES_MAX} event types")
    if kind == "webhook":
        secret = check_secret(secret) if secret is not None else new_secret()
    elif secret is not None:
        raise InvalidRequest("a Celery endpoint is not signed: it takes no secret")
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        endpoint = Endpoint(
            url=url,
            kind=kind,
            secret=secret,
            event_types=list(event_types) if event_types is not None else None,
            status="active",
            from_offset=stream.hold_numbering(session, now),
            created_at=now,
        )
        session.add(endpoint)
        session.flush()
        return NewEndpoint(endpoint.id, url, secret)


def remove_endpoint(ctx: Context, endpoint_id: int) -> None:
    """Stop delivering to it (its pending deliveries are dropped with it)."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        stream.hold_numbering(session, now)
        endpoint = session.get(Endpoint, endpoint_id)
        if endpoint is None or endpoint.removed_at is not None:
            raise NotFound(f"endpoint {endpoint_id} does not exist")
        endpoint.removed_at = now
        session.execute(delete(Delivery).where(Delivery.endpoint_id == endpoint_id, Delivery.state == "pending"))


def rotate_secret(ctx: Context, endpoint_id: int, secret: str | None = None) -> str:
    """Add a new secret (returned, shown once); requests are signed with the new and the old ones until
    `retire_old_secrets`, so receivers can switch at their own pace."""
    secret = check_secret(secret) if secret is not None else new_secret()
    with ctx.unit_of_work() as session:
        endpoint = _live_endpoint(session, endpoint_id)
        if endpoint.kind != "webhook":
            raise InvalidRequest("a Celery endpoint has no secret")
        old = (endpoint.secret or "").split()
        endpoint.secret = " ".join([secret, *old][:3])
    return secret


def retire_old_secrets(ctx: Context, endpoint_id: int) -> int:
    """Sign with the newest secret only; how many older secrets were dropped."""
    with ctx.unit_of_work() as session:
        endpoint = _live_endpoint(session, endpoint_id)
        if endpoint.kind != "webhook":
            raise InvalidRequest("a Celery endpoint has no secret")
        secrets_ = (endpoint.secret or "").split()
        endpoint.secret = secrets_[0] if secrets_ else None
        return max(len(secrets_) - 1, 0)


def list_endpoints(ctx: Context) -> list[dict[str, Any]]:
    """Endpoints with their backlog (never their secret)."""
    with ctx.sessions() as session:
        rows = []
        for endpoint in session.execute(
            select(Endpoint).where(Endpoint.removed_at.is_(None)).order_by(Endpoint.id)
        ).scalars():
            count, oldest = session.execute(
                select(func.count(), func.min(Delivery.stream_offset)).where(
                    Delivery.endpoint_id == endpoint.id, Delivery.state == "pending"
                )
            ).one()
            rows.append(
                {
                    "endpoint_id": endpoint.id,
                    "url": endpoint.url,
                    "kind": endpoint.kind,
                    "events": endpoint.event_types or "all",
                    "status": endpoint.status,
                    "failing_since": endpoint.failing_since.isoformat() if endpoint.failing_since else None,
                    "pending": int(count),
                    "oldest_pending_offset": oldest,
                }
            )
        return rows


def get_endpoint(ctx: Context, endpoint_id: int) -> Endpoint:
    """A live endpoint, detached from its session (NotFound if it was never added or was removed)."""
    with ctx.sessions() as session:
        endpoint = _live_endpoint(session, endpoint_id)
        session.expunge(endpoint)
        return endpoint


def _live_endpoint(session: Session, endpoint_id: int) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id)
    if endpoint is None or endpoint.removed_at is not None:
        raise NotFound(f"endpoint {endpoint_id} does not exist")
    return endpoint


def replay(ctx: Context, endpoint_id: int, *, from_offset: int | None = None, since: datetime | None = None) -> int:
    """Send the endpoint's events again from an offset (inclusive) or a time: already delivered ones become
    pending again, in order behind what it has pending. Returns how many events are queued."""
    if (from_offset is None) == (since is None):
        raise InvalidRequest("give exactly one of --from-offset or --since")
    if from_offset is not None and from_offset < 0:
        raise InvalidRequest("--from-offset must be 0 or more")
    now = ctx.clock.now()
    queued = 0
    with ctx.unit_of_work() as session:
        endpoint = _live_endpoint(session, endpoint_id)
        query = select(StreamEvent).where(StreamEvent.stream_offset.is_not(None))
        if from_offset is not None:
            query = query.where(StreamEvent.stream_offset >= from_offset)
        else:
            assert since is not None
            query = query.where(StreamEvent.created_at >= since)
        for event in session.execute(query.order_by(StreamEvent.stream_offset)).scalars():
            if not stream.wants(endpoint, event.type):
                continue
            assert event.stream_offset is not None
            updated = session.execute(
                update(Delivery)
                .where(Delivery.endpoint_id == endpoint.id, Delivery.stream_offset == event.stream_offset)
                .values(state="pending", next_attempt_at=now, attempts=0, delivered_at=None, claimed_until=None)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if not updated:
                bulk.insert_rows(
                    session,
                    Delivery,
                    [
                        {
                            "endpoint_id": endpoint.id,
                            "stream_offset": event.stream_offset,
                            "key": stream.ordering_key(event),
                            "state": "pending",
                            "attempts": 0,
                            "next_attempt_at": now,
                            "created_at": now,
                        }
                    ],
                )
            queued += 1
    return queued


# --- delivering ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    endpoint_id: int
    stream_offset: int
    attempts: int


def claim_heads(ctx: Context, *, limit: int = PASS_SIZE) -> list[Claimed]:
    """Claim up to `limit` due heads (see module doc); committed before anything is sent."""
    now = ctx.clock.now()
    lower = aliased(Delivery)
    with ctx.unit_of_work() as session:
        _commit_without_flush(session)
        heads = list(
            session.execute(
                select(Delivery.endpoint_id, Delivery.stream_offset, Delivery.attempts)
                .where(
                    Delivery.state == "pending",
                    Delivery.next_attempt_at <= now,
                    # Not being sent by a pass (or its lease ran out: that pass's worker died).
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until <= now),
                    # The head is its key's lowest pending offset: one probe of ix_deliveries_heads per candidate.
                    # Not NOT EXISTS (a lower pending one): statistics taken when nothing was pending (every burst
                    # starts so) made PostgreSQL run that anti-join as a scan of the whole backlog per candidate,
                    # 3.1 s per pass of 200 with 9,000 pending, against 1.7 ms for this form.
                    Delivery.stream_offset
                    == select(func.min(lower.stream_offset))
                    .where(
                        lower.endpoint_id == Delivery.endpoint_id, lower.key == Delivery.key, lower.state == "pending"
                    )
                    .scalar_subquery(),
                )
                .order_by(Delivery.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
        )
        if not heads:
            return []
        _update_per_endpoint(
            session,
            [(endpoint_id, offset) for endpoint_id, offset, _ in heads],
            # Not next_attempt_at: it is indexed, so changing it made every claim a non-HOT update.
            claimed_until=now + CLAIM_LEASE,
            attempts=Delivery.__table__.c.attempts + 1,
        )
        return [Claimed(endpoint_id, offset, attempts + 1) for endpoint_id, offset, attempts in heads]


def _commit_without_flush(session: Session) -> None:
    """This transaction's commit returns before its WAL reaches the disk (PostgreSQL's asynchronous commit).

    Only for claims and outcomes, whose loss in a crash of the database server costs a second send of the same
    `webhook-id` (at least once, as a killed worker already does) and never a lost or reordered event: a lost
    claim leaves the head unclaimed, a lost acknowledgement leaves it pending, and WAL is replayed in order, so
    a later transaction survives only with every earlier one. The sequencer's numbering stays synchronous
    (offsets once sent are never given again). A pass waited on ~40 flushes of the log (one per group of
    outcomes) and each claim's."""
    if bulk.dialect_of(session) == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit = off"))


def _update_per_endpoint(session: Session, keys: Sequence[tuple[int, int]], **values: Any) -> None:
    """The same values for these (endpoint, offset) deliveries: one statement per endpoint (by primary key,
    one array parameter on PostgreSQL) rather than one per delivery, which cost ~0.15 ms of worker CPU each."""
    offsets: dict[int, list[int]] = {}
    for endpoint_id, offset in keys:
        offsets.setdefault(endpoint_id, []).append(offset)
    dialect = bulk.dialect_of(session)
    # Core, not ORM, statements: the ORM's bulk-update path (state synchronisation, its compile step) cost more
    # worker CPU than the statement itself.
    table: Any = Delivery.__table__
    for endpoint_id, group in offsets.items():
        session.execute(
            update(table)
            .where(
                table.c.endpoint_id == endpoint_id,
                bulk.id_in(table.c.stream_offset, sorted(group), dialect),
                # Still pending: after its lease ran out another pass may have delivered the head.
                table.c.state == "pending",
            )
            .values(**values)
        )


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One sending pool per process and size, kept between passes: a pool per pass started its threads again
    and each new thread opened new keep-alive connections (the sender's sessions are per thread)."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deliver")
        return pool


def deliver_due(ctx: Context, send: Send, *, limit: int = PASS_SIZE, threads: int = 64) -> dict[str, int]:
    """One pass: number new events, claim due heads, send them concurrently, record each outcome."""
    stream.sequence(ctx)
    claimed = claim_heads(ctx, limit=limit)
    if not claimed:
        return {"delivered": 0, "failed": 0}
    with ctx.sessions() as session:
        dialect = bulk.dialect_of(session)
        endpoints = {
            e.id: e
            for e in session.execute(
                select(Endpoint).where(Endpoint.id.in_({c.endpoint_id for c in claimed}))
            ).scalars()
        }
        # One array parameter, not an IN list of a thousand parameters rendered into the statement per pass.
        by_offset = {
            e.stream_offset: e
            for e in session.execute(
                select(StreamEvent).where(
                    bulk.id_in(StreamEvent.stream_offset, sorted({c.stream_offset for c in claimed}), dialect)
                )
            ).scalars()
        }
        session.expunge_all()
    # Endpoints that were failing when the pass began: only these can recover. The others need no UPDATE per
    # group of outcomes (one marked failing meanwhile by an overlapping pass recovers at its next pass).
    failing_before = {e.id for e in endpoints.values() if e.status == "failing"}

    def attempt(claim: Claimed) -> tuple[Claimed, str | None]:
        endpoint, event = endpoints.get(claim.endpoint_id), by_offset.get(claim.stream_offset)
        if endpoint is None or event is None or endpoint.removed_at is not None:
            return claim, "gone"
        try:
            send(endpoint, event)
        except DeliveryFailed as exc:
            return claim, str(exc)[:255]
        except Exception as exc:  # a sender bug must not lose the event: it is retried like a failure
            log.exception("delivery of offset %s to endpoint %s failed", claim.stream_offset, claim.endpoint_id)
            return claim, f"error: {type(exc).__name__}"
        return claim, None

    totals = {"delivered": 0, "failed": 0}

    def record(results: list[tuple[Claimed, str | None]]) -> None:
        for key, value in _record(ctx, results, failing_before).items():
            totals[key] += value

    send_many = getattr(send, "send_many", None)
    if send_many is None and (len(claimed) == 1 or threads <= 1):
        for claim in claimed:
            record([attempt(claim)])
        return totals
    if send_many is not None:
        outcomes: Iterable[tuple[Claimed, str | None]] = _send_batch(send_many, claimed, endpoints, by_offset, threads)
    else:
        pool = _pool(threads)
        outcomes = (f.result() for f in as_completed([pool.submit(attempt, c) for c in claimed]))
    # Outcomes are recorded as they come, in small groups: a slow receiver holds back only its own events,
    # and a worker killed while it waits loses no acknowledgement already received.
    waiting: list[tuple[Claimed, str | None]] = []
    flushed_at = time.monotonic()
    for outcome in outcomes:
        waiting.append(outcome)
        if len(waiting) >= RECORD_GROUP or time.monotonic() - flushed_at > RECORD_EVERY_SECONDS:
            record(waiting)
            waiting, flushed_at = [], time.monotonic()
    if waiting:
        record(waiting)
    return totals


def _send_batch(
    send_many: Callable[[list[tuple[Endpoint, StreamEvent]], int], Iterable[tuple[int, str | None]]],
    claimed: list[Claimed],
    endpoints: dict[int, Endpoint],
    by_offset: dict[int | None, StreamEvent],
    concurrency: int,
) -> Iterator[tuple[Claimed, str | None]]:
    """A sender that sends a whole pass at once (WebhookSender: aiohttp on one event loop); outcomes as they
    come."""
    live: list[Claimed] = []
    for claim in claimed:
        endpoint, event = endpoints.get(claim.endpoint_id), by_offset.get(claim.stream_offset)
        if endpoint is None or event is None or endpoint.removed_at is not None:
            yield claim, "gone"
        else:
            live.append(claim)
    done: set[int] = set()
    try:
        for n, error in send_many([(endpoints[c.endpoint_id], by_offset[c.stream_offset]) for c in live], concurrency):
            done.add(n)
            yield live[n], None if error is None else error[:255]
    except Exception as exc:  # a sender bug must not lose the events: they are retried like failures
        log.exception("delivery of %s events failed", len(live) - len(done))
        for n, claim in enumerate(live):
            if n not in done:
                yield claim, f"error: {type(exc).__name__}"


def _record(
    ctx: Context, results: list[tuple[Claimed, str | None]], failing_before: set[int] | None = None
) -> dict[str, int]:
    """Write a group of outcomes; `failing_before` (None: any) are the endpoints that may be marked failing,
    the only ones a delivery can bring back."""
    now = ctx.clock.now()
    delivered = [c for c, error in results if error is None]
    failed = [(c, error) for c, error in results if error is not None]
    with ctx.unit_of_work() as session:
        _commit_without_flush(session)
        _update_per_endpoint(
            session,
            [(c.endpoint_id, c.stream_offset) for c in delivered],
            state="delivered",
            delivered_at=now,
            last_error=None,
            claimed_until=None,
        )
        for claim, error in failed:
            # Only the claim's own attempt: after its lease ran out another pass may have re-claimed the head
            # (attempts moved on) or delivered it.
            session.execute(
                update(Delivery)
                .where(
                    Delivery.endpoint_id == claim.endpoint_id,
                    Delivery.stream_offset == claim.stream_offset,
                    Delivery.state == "pending",
                    Delivery.attempts == claim.attempts,
                )
                .values(next_attempt_at=now + retry_delay(claim.attempts), last_error=error, claimed_until=None)
            )
        delivered_to = {c.endpoint_id for c in delivered}
        recovered = delivered_to if failing_before is None else delivered_to & failing_before
        if recovered:
            back = list(
                session.execute(
                    update(Endpoint)
                    .where(Endpoint.id.in_(recovered), Endpoint.status == "failing")
                    .values(status="active", failing_since=None)
                    .returning(Endpoint.id)
                ).scalars()
            )
            for endpoint_id in back:
                events.record(session, now, "webhook.recovered", endpoint_id=endpoint_id)
        failing = {c.endpoint_id for c, _ in failed if c.attempts >= FAILING_AFTER} - delivered_to
        if failing:
            marked = list(
                session.execute(
                    update(Endpoint)
                    .where(Endpoint.id.in_(failing), Endpoint.status == "active")
                    .values(status="failing", failing_since=now)
                    .returning(Endpoint.id)
                ).scalars()
            )
            for endpoint_id in marked:
                reason = next(e for c, e in failed if c.endpoint_id == endpoint_id)
                events.record(session, now, "webhook.failing", endpoint_id=endpoint_id, reason=reason)
    return {"delivered": len(delivered), "failed": len(failed)}


def purge(ctx: Context, *, retention: timedelta) -> int:
    """Forget events older than the retention whose deliveries are all done (a backlog is kept)."""
    cutoff = ctx.clock.now() - retention
    with ctx.unit_of_work() as session:
        old = select(StreamEvent.stream_offset).where(
            StreamEvent.created_at < cutoff, StreamEvent.stream_offset.is_not(None)
        )
        pending = select(Delivery.stream_offset).where(Delivery.state == "pending")
        # Each subscription's newest event stays: its subscription_seq continues from it, without a restart.
        newest = (
            select(func.max(StreamEvent.stream_offset))
            .where(StreamEvent.subscription_id.is_not(None))
            .group_by(StreamEvent.subscription_id)
        )
        session.execute(delete(Delivery).where(Delivery.stream_offset.in_(old), Delivery.state == "delivered"))
        result = session.execute(
            delete(StreamEvent).where(
                StreamEvent.created_at < cutoff,
                StreamEvent.stream_offset.is_not(None),
                StreamEvent.stream_offset.not_in(pending),
                StreamEvent.stream_offset.not_in(newest),
            )
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
