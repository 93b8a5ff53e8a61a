"""`billing metrics serve` scraped over HTTP: every metric agrees with `billing status --json` and the database
during a real billing run (worker, beat, the emulator over HTTP), the due lag rises while beat is stopped and
falls when it is back, labels stay in closed sets, and the live figures a quiet run never shows (a pause, a
refund's deadline) appear and clear."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, func, select, text

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.control import DatabaseClock
from billing.db.models import ChargeAttempt, Control, Invoice, Plan, Refund, Subscription
from billing.domain.money import Money
from billing.gateway import TpagaClient
from billing.metrics import BillingCollector, ScrapeError, families
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog, metrics, refunds
from billing.services.context import Context
from billing.services.pause import PauseReason, pause_billing
from billing.task_names import PERIODIC_TASKS
from tasks.testing import CeleryProcess, free_port, private_redis_db, process_env, worker
from tests.procs import wait_until

BILLING = str(Path(sys.executable).parent / "billing")
FINISHED = ("approved", "declined", "duplicate", "not_sent")
LABELS = {"state", "error_code", "decline_class", "reason", "task", "currency"}
HISTORY = (
    "billing_invoices",
    "billing_charge_attempts_total",
    "billing_refunds",
    "billing_recovered_invoices_total",
    "billing_mrr_minor_units",
)

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@contextlib.contextmanager
def metrics_server(env: dict[str, str], log_path: Path, *args: str) -> Iterator[str]:
    """A `billing metrics serve` process on a free port; yields its /metrics URL."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [BILLING, "metrics", "serve", "--port", str(port), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/metrics"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"billing metrics serve exited {proc.returncode}: {log_path.read_text()}")
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(url, timeout=10).status_code == 200
        return False

    try:
        wait_until(up, "billing metrics serve to answer", 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def scrape(url: str) -> tuple[str, Samples]:
    """The body and every sample, by sample name then by sorted labels."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return response.text, samples


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in samples.get(name, {}).items()}


def single(samples: Samples, name: str) -> float | None:
    values = samples.get(name, {})
    return values[()] if values else None


def status_json(env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([BILLING, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def with_zeros(counts: dict[str, int], states: list[str]) -> dict[str, float]:
    return {state: float(counts.get(state, 0)) for state in states}


# --- the real run ----------------------------------------------------------------------------------------


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


def _customer_with_card(ctx: Context, gateway: TpagaClient, number: str, n: int) -> tuple[int, str]:
    customer = catalog.create_customer(ctx, email=f"m{n}@example.com")
    token = gateway.tokenize_card(number=number, exp_month=3, exp_year=2031, holder_name=f"M {n}")
    card = catalog.attach_card(ctx, customer_id=customer, token=token)
    with ctx.sessions() as s:
        tpaga_card_id = s.execute(text("select tpaga_card_id from cards where id = :id"), {"id": card}).scalar_one()
    return customer, str(tpaga_card_id)


def _database_view(ctx: Context) -> dict[str, Any]:
    """What the metrics must say, read straight from the tables (independently of billing.services.metrics)."""
    with ctx.sessions() as s:
        attempts = {
            (str(state), code or "none", str(klass) if klass else "none"): float(n)
            for state, code, klass, n in s.execute(
                select(ChargeAttempt.state, ChargeAttempt.error_code, ChargeAttempt.decline_class, func.count())
                .where(ChargeAttempt.state.in_(FINISHED))
                .group_by(ChargeAttempt.state, ChargeAttempt.error_code, ChargeAttempt.decline_class)
            )
        }
        declined = select(ChargeAttempt.invoice_id).where(ChargeAttempt.state == "declined")
        recovered = s.execute(
            select(func.count()).where(Invoice.state == "paid", Invoice.id.in_(declined))
        ).scalar_one()
        paying = s.execute(
            select(Plan.currency, Plan.amount_minor, Plan.interval, func.count())
            .join(Subscription, Subscription.plan_id == Plan.id)
            .where(Subscription.status.in_(["active", "past_due"]), Subscription.paused_at.is_(None))
            .group_by(Plan.currency, Plan.amount_minor, Plan.interval)
        ).all()
        leases = {
            key.removeprefix("lease:"): at.timestamp()
            for key, at in s.execute(select(Control.key, Control.updated_at).where(Control.key.like("lease:%")))
        }
        review_since = s.execute(select(func.min(Invoice.updated_at)).where(Invoice.state == "review")).scalar_one()
        pending_refunds = s.execute(
            select(func.count()).where(Refund.state.in_(["requested", "sending", "unknown"]))
        ).scalar_one()
    mrr: dict[str, float] = {}
    for currency, amount, interval, n in paying:
        mrr[currency] = mrr.get(currency, 0) + amount * n / (12 if interval == "year" else 1)
    return {
        "attempts": attempts,
        "recovered": float(recovered),
        "mrr": mrr,
        "leases": leases,
        "review_since": review_since,
        "pending_refunds": pending_refunds,
    }


def _mismatches(samples: Samples, status: dict[str, Any], db: dict[str, Any]) -> list[str]:
    """Every history metric against `billing status --json` and the tables; empty when all agree."""
    wrong = []
    invoice_states = ["open", "paid", "review", "uncollectible", "void"]
    if by(samples, "billing_invoices", "state") != with_zeros(status["invoices"], invoice_states):
        wrong.append(f"invoices {by(samples, 'billing_invoices', 'state')} vs status {status['invoices']}")
    attempts = {
        tuple(dict(labels)[k] for k in ("state", "error_code", "decline_class")): value
        for labels, value in samples.get("billing_charge_attempts_total", {}).items()
    }
    if attempts != db["attempts"]:
        wrong.append(f"attempts {attempts} vs database {db['attempts']}")
    per_state: dict[str, float] = {}
    for (state, _, _), value in attempts.items():
        per_state[state] = per_state.get(state, 0) + value
    if per_state != {k: float(v) for k, v in status["attempts"].items() if k in FINISHED}:
        wrong.append(f"attempts by state {per_state} vs status {status['attempts']}")
    refund_states = ["requested", "sending", "voided", "rejected", "expired", "unknown"]
    if by(samples, "billing_refunds", "state") != with_zeros(status["refunds"], refund_states):
        wrong.append(f"refunds {by(samples, 'billing_refunds', 'state')} vs status {status['refunds']}")
    if single(samples, "billing_review_queue_items") != status["review"]:
        wrong.append(f"review {single(samples, 'billing_review_queue_items')} vs status {status['review']}")
    if single(samples, "billing_recovered_invoices_total") != db["recovered"]:
        wrong.append(f"recovered {single(samples, 'billing_recovered_invoices_total')} vs {db['recovered']}")
    if by(samples, "billing_mrr_minor_units", "currency") != db["mrr"]:
        wrong.append(f"mrr {by(samples, 'billing_mrr_minor_units', 'currency')} vs {db['mrr']}")
    return wrong


@pytest.mark.celery
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
def test_every_metric_agrees_with_status_and_the_database_during_a_real_run(
    pg_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    migrate.upgrade(pg_url)
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    settings = Settings(
        database_url=pg_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY, clock="database"
    )
    ctx = build_context(settings, gateway=gateway)
    env = process_env(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            "BILLING_CLOCK": "database",
            "BILLING_DUNNING_POLICY": "fixed",  # the soft decline's retry comes a day later, whatever the date
            "BILLING_BEAT_OPEN_SECONDS": "1",
            "BILLING_BEAT_SWEEP_SECONDS": "2",
            "BILLING_BEAT_REFUNDS_SECONDS": "1",
            "BILLING_BEAT_RECONCILE_SECONDS": "2",
            "BILLING_BEAT_OUTBOX_SECONDS": "1",
            "BILLING_OUTBOX_MIN_AGE_SECONDS": "1",
            "BILLING_SWEEP_GRACE_SECONDS": "1",
        }
    )
    monthly = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    yearly = catalog.create_plan(
        ctx, code="y", name="Yearly", amount=Money.from_major("1200000", "COP"), interval="year"
    )
    card_ids: list[str] = []

    def subscribe(number: str, plan: int = monthly) -> int:
        customer, card = _customer_with_card(ctx, gateway, number, len(card_ids))
        card_ids.append(card)
        return catalog.subscribe(ctx, customer_id=customer, plan_id=plan)

    seen: list[dict[str, int]] = [{}]

    def invoice_states() -> dict[str, int]:
        with ctx.sessions() as s:
            seen[0] = {str(k): v for k, v in s.execute(select(Invoice.state, func.count()).group_by(Invoice.state))}
        return seen[0]

    def wait_for_invoices(check: Any, what: str) -> None:
        try:
            wait_until(lambda: check(invoice_states()), what, 60)
        except TimeoutError:
            pytest.fail(f"{what}: invoices {seen[0]}; worker log:\n{proc.log_text()[-3000:]}")

    def beat() -> CeleryProcess:
        return CeleryProcess(
            ["beat", "--loglevel", "INFO", "-s", str(tmp_path / "schedule")], env, tmp_path / "beat.log"
        )

    scheduler = beat()
    try:
        with (
            worker(env, tmp_path / "worker.log") as proc,
            metrics_server(env, tmp_path / "metrics.log") as url,
        ):
            proc.wait_for_log(r"ready\.")
            # Given paid monthly and yearly subscriptions, a soft decline (scripted: 51 once, then approves) and a
            # hard decline (14: the card is unusable, the invoice waits for a new card)
            for _ in range(3):
                subscribe("4111111111111111")
            subscribe("4242424242424242", plan=yearly)
            soft = subscribe("4111111111111111")
            requests.post(
                sandbox.base_url + "__sandbox/script", json={"creditCard": card_ids[-1], "outcomes": ["51"]}, timeout=10
            ).raise_for_status()
            subscribe("4000000000140006")
            scheduler.start()
            wait_for_invoices(lambda states: states == {"paid": 4, "open": 2}, "4 paid, 2 declined and open")

            # And a refund of one charge, voided by the worker
            with ctx.sessions() as s:
                first_paid = s.execute(select(func.min(Invoice.id)).where(Invoice.state == "paid")).scalar_one()
            refund = refunds.request_refund(ctx, invoice_id=first_paid, reason="asked")
            with ctx.sessions() as s:
                wait_until(lambda: s.get(Refund, refund.refund_id, populate_existing=True).state == "voided", "void")

            # And a charge whose answer is lost (the review queue), then a day later the soft decline's retry
            requests.post(sandbox.base_url + "__sandbox/faults", json={"nextCharges": ["drop"]}, timeout=10)
            subscribe("5500000000000004")
            wait_for_invoices(lambda states: states.get("review") == 1, "one invoice in review")
            clock = ctx.clock
            assert isinstance(clock, DatabaseClock)
            clock.advance(timedelta(hours=25))
            with ctx.sessions() as s:
                wait_until(
                    lambda: (
                        s.execute(
                            select(Invoice.state)
                            .where(Invoice.subscription_id == soft)
                            .execution_options(populate_existing=True)
                        ).scalar_one()
                        == "paid"
                    ),
                    "the soft decline recovered on its retry",
                    60,
                )

            # Then, once the run is quiet, every metric agrees with `billing status --json` and the tables
            last: list[str] = []

            def agree() -> bool:
                status, db = status_json(env), _database_view(ctx)
                samples = scrape(url)[1]
                again = status_json(env)
                last[:] = _mismatches(samples, status, db) + (["moved during the scrape"] if again != status else [])
                return not last

            try:
                wait_until(agree, "metrics to agree with status and the database", 60, 0.5)
            except TimeoutError:
                pytest.fail(f"metrics disagree: {last}")
            before, now_before = _database_view(ctx), ctx.clock.now()
            body, samples = scrape(url)
            after, now_after = _database_view(ctx), ctx.clock.now()
            assert by(samples, "billing_invoices", "state")["paid"] == 5
            assert (
                samples["billing_charge_attempts_total"][
                    (("decline_class", "soft"), ("error_code", "51"), ("state", "declined"))
                ]
                == 1
            )
            assert (
                samples["billing_charge_attempts_total"][
                    (("decline_class", "hard"), ("error_code", "14"), ("state", "declined"))
                ]
                == 1
            )
            assert single(samples, "billing_recovered_invoices_total") == 1
            # Six monthly subscriptions at 3,000,000 minor units (the hard decline's is past_due: still billed, and
            # the one in review is active) and a twelfth of the yearly one's 120,000,000
            assert by(samples, "billing_mrr_minor_units", "currency") == {"COP": 6 * 3_000_000 + 10_000_000}
            assert by(samples, "billing_refunds", "state")["voided"] == 1
            assert single(samples, "billing_refund_nearest_deadline_seconds") is None
            assert before["pending_refunds"] == 0
            # The review item's age, between what the clock said before and after the scrape
            age = single(samples, "billing_review_oldest_age_seconds")
            assert age is not None
            since = before["review_since"]
            assert (now_before - since).total_seconds() <= age <= (now_after - since).total_seconds()
            assert age > 25 * 3600
            assert by(samples, "billing_paused", "reason") == {r.value: 0 for r in PauseReason}
            # Each periodic task's last run is its lease, read between the two views of the table
            runs = by(samples, "billing_periodic_last_run_timestamp_seconds", "task")
            assert set(runs) == set(PERIODIC_TASKS)
            for task, at in runs.items():
                assert before["leases"][task] <= at <= after["leases"][task]
            assert single(samples, "billing_due_lag_seconds") == 0

            # Labels come from closed sets; no id, card, order or key appears anywhere
            names = {name for labels in samples.values() for key in labels for name, _ in key}
            assert names <= LABELS
            for secret in [*card_ids, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, "o-", pg_url.split("@")[-1]]:
                assert secret not in body
            with ctx.sessions() as s:
                orders = list(s.execute(select(ChargeAttempt.order_id)).scalars())
            assert orders and not any(order in body for order in orders)

            # When beat stops and a subscription falls due, the due lag rises
            scheduler.stop()
            subscribe("4111111111111111")
            lags: list[float] = []

            def lag_after(floor: float) -> bool:
                value = single(scrape(url)[1], "billing_due_lag_seconds")
                assert value is not None
                lags.append(value)
                return value > floor

            wait_until(lambda: lag_after(0.0), "the due lag to rise above 0", 30)
            first = lags[-1]
            wait_until(lambda: lag_after(first), "the due lag to keep rising while beat is stopped", 30)
            # And falls back to 0 once beat is back and the invoice is opened and paid
            scheduler = beat()
            scheduler.start()
            wait_until(lambda: single(scrape(url)[1], "billing_due_lag_seconds") == 0, "the due lag to fall to 0", 60)
            wait_for_invoices(lambda states: states.get("paid") == 6, "the new subscription's invoice paid")
    finally:
        scheduler.stop()
        gateway.close()
        ctx.sessions.kw["bind"].dispose()


# --- what a quiet run never shows, on SQLite -------------------------------------------------------------


def test_a_pause_and_a_pending_refund_show_at_once_in_the_live_figures_and_the_counts(
    sqlite_url: str, sandbox: Any, tmp_path: Path
) -> None:
    from billing.services.context import DropPublisher
    from billing.services.tick import run_tick

    migrate.upgrade(sqlite_url)
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    ctx = build_context(
        Settings(database_url=sqlite_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY),
        gateway=gateway,
        publisher=DropPublisher(),
    )
    env = process_env({"DATABASE_URL": sqlite_url})
    plan = catalog.create_plan(ctx, code="m", name="Monthly", amount=Money.from_major("30000", "COP"))
    customer, _ = _customer_with_card(ctx, gateway, "4111111111111111", 1)
    catalog.subscribe(ctx, customer_id=customer, plan_id=plan)
    run_tick(ctx, threads=1)
    try:
        with metrics_server(env, tmp_path / "metrics.log") as url:
            # Given a refund requested and not yet run (no worker here)
            before = datetime.now(UTC)
            refund = refunds.request_refund(ctx, invoice_id=1, reason="asked")
            with ctx.sessions() as s:
                deadline = s.get(Refund, refund.refund_id).deadline_at  # type: ignore[union-attr]
            # Then the live figures and the maintained counts show it at once
            samples = scrape(url)[1]
            after = datetime.now(UTC)
            left = single(samples, "billing_refund_nearest_deadline_seconds")
            assert left is not None
            assert (deadline - after).total_seconds() <= left <= (deadline - before).total_seconds()
            assert by(samples, "billing_refunds", "state")["requested"] == 1
            assert by(scrape(url)[1], "billing_invoices", "state")["paid"] == 1

            # When Tpaga rejects the key, billing pauses: the reason shows
            with ctx.unit_of_work() as session:
                pause_billing(session, ctx.clock.now(), PauseReason.UNAUTHORIZED, None)
            paused = by(scrape(url)[1], "billing_paused", "reason")
            assert paused == {"unauthorized": 1, "merchant_decline": 0, "gateway_unreachable": 0}
            assert status_json(env)["paused"]["reason"] == "unauthorized"
            # And `billing resume` clears it
            out = subprocess.run([BILLING, "resume"], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert set(by(scrape(url)[1], "billing_paused", "reason").values()) == {0}
    finally:
        gateway.close()
        ctx.sessions.kw["bind"].dispose()


def test_a_database_that_cannot_be_read_answers_503_without_secrets(pg_url: str, tmp_path: Path) -> None:
    migrate.upgrade(pg_url)
    env = process_env({"DATABASE_URL": pg_url.replace("postgres@", "postgres:s3cret-pw@")})
    with metrics_server(env, tmp_path / "metrics.log") as url:
        engine = create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(text("drop table control"))
        engine.dispose()
        response = requests.get(url, timeout=10)
        assert response.status_code == 503
        assert response.text == "cannot read the database: UndefinedTable\n"
    assert "s3cret-pw" not in (tmp_path / "metrics.log").read_text()


def test_serve_refuses_an_unmigrated_database_with_the_usual_message(sqlite_url: str) -> None:
    out = subprocess.run(
        [BILLING, "metrics", "serve", "--port", "0"],
        env=process_env({"DATABASE_URL": sqlite_url}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "is not migrated" in out.stderr and "billing db upgrade" in out.stderr


# --- the collector: a fold, then one read, per scrape ------------------------------------------------------


def _live() -> metrics.Live:
    return metrics.Live(datetime.now(UTC), 0, 0.0, 0.0, None, None, {})


def _history(paid: int) -> metrics.History:
    return metrics.History(datetime.now(UTC), {"paid": paid}, {}, {}, 0, {})


def test_every_scrape_folds_then_reads_and_a_failed_fold_still_serves_the_counts() -> None:
    calls: list[str] = []
    failing = threading.Event()

    def read() -> tuple[metrics.Live, metrics.History]:
        calls.append("read")
        return _live(), _history(len(calls))

    def fold() -> int:
        calls.append("fold")
        if failing.is_set():
            raise ScrapeError("cannot fold the metric deltas: InsufficientPrivilege")
        return 3

    collector = BillingCollector(read, fold)
    paid = [next(f for f in collector.collect() if f.name == "billing_invoices").samples[0].value for _ in (1, 2)]
    assert calls == ["fold", "read", "fold", "read"] and paid == [2, 4]
    # A database user that may not write (a replica) cannot fold: the scrape reads the unfolded deltas instead
    failing.set()
    assert "billing_invoices" in {family.name for family in collector.collect()}
    assert calls[-2:] == ["fold", "read"]
    # A read that fails fails the scrape (503), it is never served from an older read
    with pytest.raises(ScrapeError):
        BillingCollector(lambda: (_ for _ in ()).throw(ScrapeError("cannot read the database: X"))).collect()


def test_error_codes_become_labels_only_from_the_documented_set() -> None:
    assert [metrics.code_label(c) for c in ("00", "51", "5", "t8", "9999", None, "", "7777", "A1B2C3")] == [
        "00",
        "51",
        "05",
        "T8",
        "9999",
        "none",
        "none",
        "other",
        "other",
    ]


def test_families_have_the_documented_names() -> None:
    live = metrics.Live(
        datetime.now(UTC), 1, 2.0, 3.0, "merchant_decline", 4.0, {"billing.reconcile": datetime.now(UTC)}
    )
    history = metrics.History(
        datetime.now(UTC),
        {"paid": 1},
        {("declined", "51", "soft"): 2},
        {"voided": 1},
        1,
        {"COP": 5},
        {"3": 7},
        {"3": True},
    )
    registry_names = {sample.name for family in families(live, history) for sample in family.samples}
    assert registry_names == {
        "billing_invoices",
        "billing_charge_attempts_total",
        "billing_review_queue_items",
        "billing_review_oldest_age_seconds",
        "billing_due_lag_seconds",
        "billing_paused",
        "billing_refunds",
        "billing_refund_nearest_deadline_seconds",
        "billing_periodic_last_run_timestamp_seconds",
        "billing_recovered_invoices_total",
        "billing_mrr_minor_units",
        "billing_webhook_backlog",
        "billing_webhook_endpoint_failing",
    }
