"""`billing demo`: months of billing in a few minutes, on the embedded default, with real Celery processes.

The demo starts the emulator, migrates the database, registers a webhook receiver (an in-process
`billing webhooks listen` on a free loopback port), seeds customers with a mix of test cards, runs a real
`celery worker` and `celery beat`, moves the shared test clock (and the emulator's) forward through several
months, and ends with a report by errorCode, a reconciliation of the emulator's ledger against the database, and
the events the receiver got (each verified, each subscription's in order, none missing).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import click
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.config import Settings
from billing.db.control import DatabaseClock
from billing.db.models import (
    ChargeAttempt,
    Delivery,
    Endpoint,
    Invoice,
    OutboxMessage,
    Refund,
    StreamEvent,
    Subscription,
)
from billing.display import counts, duration
from billing.domain.money import Money
from billing.listener import Heard, Listener, summary

APPROVING = "4111111111111111"
# (label, card number, how many customers)
CARD_MIX: tuple[tuple[str, str, int], ...] = (
    ("approves", "4111111111111111", 6),
    ("approves (MASTERCARD)", "5500000000000004", 2),
    ("approves (AMEX)", "378282246310005", 1),
    ("soft 51, recovers on retry", "4000000000770000", 1),
    ("soft 51 every time", "4000000000510000", 1),
    ("soft 05 every time", "4000000000050007", 1),
    ("hard 43 (stolen card)", "4000000000430001", 1),
    ("hard 54 (expired card)", "4000000000540007", 1),
    ("unknown 9999", "4000000099990006", 1),
)


@dataclass
class DemoResult:
    ok: bool
    lines: list[str] = field(default_factory=list)


EVENT_LINES_SHOWN = 5


@dataclass
class Received:
    """What the demo's webhook receiver heard, in arrival order."""

    heard: list[Heard] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, heard: Heard) -> None:
        with self.lock:
            self.heard.append(heard)

    def report(self, session: Session, endpoint_id: int, from_offset: int) -> tuple[bool, list[str]]:
        """Counts per type, and whether every event of the stream since the endpoint was added arrived verified
        and each subscription's events in order (subscription_seq 1, 2, 3 ... as first received)."""
        with self.lock:
            heard = list(self.heard)
        verified = [h for h in heard if h.body is not None]
        first: dict[str, dict[str, Any]] = {}
        for h in verified:
            assert h.body is not None
            first.setdefault(h.webhook_id, h.body)
        expected = set(
            session.execute(select(StreamEvent.event_id).where(StreamEvent.stream_offset > from_offset)).scalars()
        )
        seqs: dict[int, list[int]] = {}
        for body in first.values():
            if body.get("subscription_id") is not None:
                seqs.setdefault(int(body["subscription_id"]), []).append(int(body["subscription_seq"]))
        out_of_order = sorted(s for s, got in seqs.items() if got != sorted(got) or len(set(got)) != len(got))
        missing = expected - set(first)
        rejected = len(heard) - len(verified)
        lines = [f"{n:>6}  {t}" for t, n in sorted(Counter(b["type"] for b in first.values()).items())]
        lines.append(
            f"{len(first):>6}  in all ({len(verified)} requests to endpoint {endpoint_id}, "
            + ("every signature verified" if not rejected else f"{rejected} with a bad signature")
            + f", {len(verified) - len(first)} repeated)"
        )
        lines += ["first lines as `billing webhooks listen` prints them:"]
        lines += [f"  {summary(h)}" for h in verified[:EVENT_LINES_SHOWN]]
        ok = not missing and not rejected and not out_of_order and bool(expected)
        if missing:
            lines.append(f"MISSING: {len(missing)} of the {len(expected)} events in the stream never arrived")
        if out_of_order:
            lines.append(f"OUT OF ORDER: the events of subscriptions {out_of_order[:10]}")
        if not expected:
            lines.append("NO EVENTS: the stream is empty")
        return ok, lines


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env(database_url: str, broker_url: str, api_url: str, clock: str, **beat: str) -> dict[str, str]:
    """The environment of a demo's worker and beat: this one's, with the demo's database, broker and emulator,
    and beat's periods shortened so that a demo's minutes show its work (`beat` overrides or adds periods)."""
    from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY

    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        CELERY_BROKER_URL=broker_url,
        TPAGA_API_URL=api_url,
        TPAGA_PRIVATE_KEY=DEFAULT_PRIVATE_KEY,
        TPAGA_PUBLIC_KEY=DEFAULT_PUBLIC_KEY,
        BILLING_CLOCK=clock,
        BILLING_BEAT_OPEN_SECONDS="1",
        BILLING_BEAT_SWEEP_SECONDS="2",
        BILLING_BEAT_OUTBOX_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(beat)
    return env


@contextmanager
def process(cmd: list[str], env: dict[str, str], log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:  # each run's logs alone
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")


def quiet(session: Session, now: Any) -> bool:
    """Nothing due or in flight: every due period has its invoice and every due invoice has been tried."""
    due_subs = session.execute(
        select(func.count(Subscription.id)).where(Subscription.next_billing_at <= now)
    ).scalar_one()
    due_invoices = session.execute(
        select(func.count(Invoice.id)).where(Invoice.state == "open", Invoice.due_at <= now)
    ).scalar_one()
    in_flight = session.execute(
        select(func.count(ChargeAttempt.id)).where(ChargeAttempt.state.in_(("pending", "sending")))
    ).scalar_one()
    refunds = session.execute(
        select(func.count(Refund.id)).where(Refund.state.in_(("requested", "sending")))
    ).scalar_one()
    return not (due_subs or due_invoices or in_flight or refunds)


def reconcile_ledger(session: Session, sandbox_url: str) -> tuple[bool, list[str]]:
    """Compare approved, not-voided charges at the emulator with the database, by orderId."""
    ledger = requests.get(f"{sandbox_url}__sandbox/ledger", timeout=10).json()
    at_tpaga = Counter(c["orderId"] for c in ledger["charges"] if c["paid"] and not c["voided"])
    voided_ids = {c["id"] for c in ledger["charges"] if c["voided"]}
    rows = session.execute(
        select(ChargeAttempt.order_id, ChargeAttempt.tpaga_charge_id, Refund.state)
        .outerjoin(Refund, Refund.charge_attempt_id == ChargeAttempt.id)
        .where(ChargeAttempt.state == "approved")
    ).all()
    ours = Counter(order for order, _, refund in rows if refund != "voided")
    our_voids = {charge_id for _, charge_id, refund in rows if refund == "voided"}
    lines = [
        f"emulator: {sum(at_tpaga.values())} approved charges kept, {len(voided_ids)} voided",
        f"database: {sum(ours.values())} approved attempts kept, {len(our_voids)} voided",
    ]
    doubles = [order for order, n in at_tpaga.items() if n > 1]
    ok = at_tpaga == ours and voided_ids == our_voids and not doubles
    if doubles:
        lines.append(f"DOUBLE CHARGES at the emulator: {doubles}")
    if at_tpaga != ours:
        lines.append(
            f"MISMATCH: only at emulator {sorted(set(at_tpaga) - set(ours))}, "
            f"only in database {sorted(set(ours) - set(at_tpaga))}"
        )
    if voided_ids != our_voids:
        lines.append("MISMATCH in voided charges")
    return ok, lines


def run_demo(months: int = 3, echo: Callable[[str], None] = click.echo) -> bool:
    """Run the whole demo; True when the ledger and the database agree and every event reached the receiver."""
    from billing.bootstrap import build_context
    from billing.db.migrate import upgrade
    from billing.gateway import TpagaClient
    from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, SandboxThread
    from billing.services import catalog, delivery, reports
    from billing.services.subscriptions import cancel_subscription

    started = time.monotonic()
    Settings.from_env()  # a malformed setting (.env included) stops the demo before anything starts
    # Fresh state every run: the test clock the demo advances lives in the database, and the emulator starts
    # empty each time, so a database kept from an earlier run would disagree with the new emulator's ledger. The
    # demo never uses DATABASE_URL or CELERY_BROKER_URL, so the README's later commands find their billing.db
    # as they left it.
    state = tempfile.mkdtemp(prefix="billing-demo-")
    os.makedirs("demo-logs", exist_ok=True)
    # strict: the project's own client must depend on no leniency real Tpaga may lack (docs/sandbox.md)
    sandbox = SandboxThread(SandboxConfig(port=_free_port(), strict=True))
    sandbox.start()
    with ExitStack() as stack:  # unwinds the receiver and its endpoint, then the emulator
        stack.callback(sandbox.stop)
        env = worker_env(
            database_url=f"sqlite:///{os.path.join(state, 'billing.db')}",
            broker_url=f"sqla+sqlite:///{os.path.join(state, 'celery-broker.db')}",
            api_url=sandbox.api_url,
            clock="database",
            BILLING_BEAT_REFUNDS_SECONDS="2",
            BILLING_BEAT_RECONCILE_SECONDS="3",
            BILLING_BEAT_OUTBOX_SECONDS="2",
            BILLING_BEAT_EVENTS_SECONDS="1",
        )
        settings = Settings.from_env(env)
        echo(f"[demo] emulator at {sandbox.api_url}")
        echo(f"[demo] fresh state in {state} (its own database and broker, removed when the demo succeeds)")
        upgrade(settings.database_url)
        client = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
        ctx = build_context(settings, gateway=client)
        assert isinstance(ctx.clock, DatabaseClock)
        clock = ctx.clock
        # The receiver an integrator would run: the endpoint gets every event from here on.
        secret = delivery.new_secret()
        received = Received()
        listener = Listener([secret], received).start()
        stack.callback(listener.stop)
        endpoint = delivery.add_endpoint(ctx, listener.url, secret=secret)
        stack.callback(delivery.remove_endpoint, ctx, endpoint.endpoint_id)
        with ctx.sessions() as session:
            from_offset = session.get_one(Endpoint, endpoint.endpoint_id).from_offset
        echo(f"[demo] webhook receiver at {listener.url} (endpoint {endpoint.endpoint_id}, every event)")

        def advance(delta: timedelta, label: str) -> None:
            clock.advance(delta)
            requests.post(
                f"{sandbox.base_url}__sandbox/clock", json={"advanceSeconds": delta.total_seconds()}, timeout=10
            ).raise_for_status()
            echo(f"[demo] clock +{duration(delta)} -> {clock.now():%Y-%m-%d %H:%M} UTC ({label})")

        plan_id = _plan(ctx, catalog)
        subs: dict[str, list[int]] = {}
        hard_customer = 0
        for label, number, count in CARD_MIX:
            for i in range(count):
                customer_id = catalog.create_customer(
                    ctx, email=f"demo{len(subs)}-{i}@example.com", first_name="Demo", last_name=label.split()[0]
                )
                token = client.tokenize_card(number=number, exp_month=12, exp_year=2030, holder_name="Demo User")
                catalog.attach_card(ctx, customer_id=customer_id, token=token)
                subs.setdefault(label, []).append(catalog.subscribe(ctx, customer_id=customer_id, plan_id=plan_id))
                if number == "4000000000430001":
                    hard_customer = customer_id
        echo(
            f"[demo] seeded {sum(len(v) for v in subs.values())} subscriptions: "
            + ", ".join(f"{len(v)} {k}" for k, v in subs.items())
        )
        logs = os.path.abspath("demo-logs")
        worker_cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "--loglevel=INFO",
            "--pool=threads",
            "--concurrency=8",
            "--without-mingle",
            "--without-gossip",
        ]
        beat_cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "beat",
            "--loglevel=INFO",
            "--schedule",
            os.path.join(state, "celerybeat-schedule"),
        ]
        with (
            process(worker_cmd, env, os.path.join(logs, "worker.log")),
            process(beat_cmd, env, os.path.join(logs, "beat.log")),
        ):
            echo("[demo] celery worker and beat started (logs in demo-logs/)")

            def settle(what: str) -> None:
                def done() -> bool:
                    with ctx.sessions() as session:
                        return quiet(session, clock.now())

                wait(done, 120, what)
                with ctx.sessions() as session:
                    s = reports.status(session)
                echo(f"[demo]   invoices {counts(s['invoices'])}; refunds {counts(s['refunds'])}")

            settle("the first charges")
            advance(timedelta(hours=2), "a customer cancels and asks for the last charge back")
            canceled = subs["approves"][0]
            result = cancel_subscription(ctx, subscription_id=canceled, refund_last_charge=True)
            refund = result.get("refund")
            echo(
                f"[demo] canceled subscription {canceled}: "
                + (f"refund {refund['refund_id']} {refund['state']}" if refund else "no paid invoice to refund")
            )
            settle("the refund")
            # Dunning: the clock goes to each retry time the policy set (BILLING_DUNNING_POLICY: with the default,
            # a 51 waits for the next payday), for the window's length at most.
            dunning_ends = clock.now() + timedelta(days=settings.dunning_window_days + 1)
            while (retry_at := _next_retry(ctx, clock.now())) is not None and retry_at < dunning_ends:
                advance(retry_at - clock.now() + timedelta(minutes=5), f"dunning retries due {retry_at:%Y-%m-%d %H:%M}")
                settle("dunning retries")
            echo("[demo] the customer with the stolen card adds a new card")
            token = client.tokenize_card(number=APPROVING, exp_month=11, exp_year=2031, holder_name="Demo User")
            catalog.attach_card(ctx, customer_id=hard_customer, token=token)
            settle("the retry on the new card")
            late = subs["approves"][1]
            with ctx.sessions() as session:
                invoice_id = (
                    session.execute(select(Invoice.id).where(Invoice.subscription_id == late, Invoice.state == "paid"))
                    .scalars()
                    .first()
                )
            from billing.services.refunds import request_refund

            assert invoice_id is not None
            outcome = request_refund(ctx, invoice_id=invoice_id, reason="asked too late")
            asked = duration(clock.now() - _approved_at(ctx, invoice_id))
            echo(f"[demo] a refund asked {asked} after approval: {outcome.state}")
            for month in range(1, months + 1):
                advance(timedelta(days=31), f"month {month}: renewals")
                settle(f"month {month}")
            wait(lambda: _outbox_empty(ctx), 30, "the outbox to drain")
            wait(lambda: _stream_delivered(ctx, endpoint.endpoint_id), 180, "the event stream to reach the receiver")
        with ctx.sessions() as session:
            echo("\nOutcomes by errorCode:")
            echo(f"  {'errorCode':<10}{'class':<10}{'state':<10}{'count':>6}")
            for row in reports.outcomes_by_code(session):
                echo(f"  {row['error_code'] or '-':<10}{row['class'] or '-':<10}{row['state']:<10}{row['count']:>6}")
            status = reports.status(session)
            echo(
                f"\nStatus: invoices {counts(status['invoices'])}; review queue {status['review']}; "
                f"refunds {counts(status['refunds'])}"
            )
            ok, lines = reconcile_ledger(session, sandbox.base_url)
            events_ok, event_lines = received.report(session, endpoint.endpoint_id, from_offset)
        echo("\nLedger reconciliation:")
        for line in lines:
            echo(f"  {line}")
        echo("\nEvents the webhook receiver got:")
        for line in event_lines:
            echo(f"  {line}")
        echo(
            f"\n[demo] {'OK' if ok and events_ok else 'FAILED'}: ledger and database "
            f"{'agree' if ok else 'disagree'}; "
            f"{'every event reached the receiver, in order' if events_ok else 'the event stream fell short'}; "
            f"took {time.monotonic() - started:.0f}s"
        )
        if not (ok and events_ok):
            echo(f"[demo] its database is kept for a look: {settings.database_url}")
    if ok and events_ok:  # after the processes, the receiver's endpoint and the emulator are gone
        shutil.rmtree(state, ignore_errors=True)
    return ok and events_ok


def _next_retry(ctx: Any, now: Any) -> Any:
    """The earliest time an open invoice is due again after `now` (a dunning retry), or None."""
    with ctx.sessions() as session:
        return session.execute(
            select(func.min(Invoice.due_at)).where(Invoice.state == "open", Invoice.due_at > now)
        ).scalar_one_or_none()


def _plan(ctx: Any, catalog: Any) -> int:
    from billing.db.models import Plan

    with ctx.sessions() as session:
        existing = session.execute(select(Plan.id).where(Plan.code == "demo-monthly")).scalar_one_or_none()
    if existing is not None:
        return int(existing)
    return int(catalog.create_plan(ctx, code="demo-monthly", name="Demo monthly", amount=Money(4_500_000, "COP")))


def _approved_at(ctx: Any, invoice_id: int) -> Any:
    with ctx.sessions() as session:
        return session.execute(
            select(ChargeAttempt.approved_at).where(
                ChargeAttempt.invoice_id == invoice_id, ChargeAttempt.state == "approved"
            )
        ).scalar_one()


def _outbox_empty(ctx: Any) -> bool:
    with ctx.sessions() as session:
        return not session.execute(
            select(func.count(OutboxMessage.id)).where(OutboxMessage.published_at.is_(None))
        ).scalar_one()


def _stream_delivered(ctx: Any, endpoint_id: int) -> bool:
    """Every committed event numbered, and none waiting for the endpoint."""
    with ctx.sessions() as session:
        unsequenced = session.execute(select(StreamEvent.id).where(StreamEvent.stream_offset.is_(None)).limit(1))
        pending = session.execute(
            select(Delivery.stream_offset).where(Delivery.endpoint_id == endpoint_id, Delivery.state == "pending")
        )
        return unsequenced.first() is None and pending.first() is None
