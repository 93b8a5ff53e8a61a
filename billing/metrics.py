"""`billing metrics serve`: a Prometheus exporter that reads the business state from the database at scrape time.

A custom Collector, not counters kept in a process: every worker, beat and operator writes the database, so
the database is the one place that knows how many invoices are paid, and any number of exporters (or a
restarted one) report the same figures. The names are a contract (docs/operations.md, section 11).

Every scrape reads everything, in one read-only snapshot and without a table scan (billing.services.metrics):
the live figures from the workers' own indexes, the counts from the totals the database's triggers maintain.
Before reading, the scrape folds the deltas appended since the last fold, in a short write transaction of its
own; an exporter that may not write (a read-only user or replica) reads the totals plus the unfolded deltas,
which is the same figure, only slower as the deltas pile up until the reconcile task folds them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from billing.clock import Clock
from billing.db.engine import normalize_url
from billing.services import metrics as queries
from billing.services.pause import PauseReason

log = logging.getLogger("billing.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9108
# A read (or a fold) that would take longer is cut by the database, not left running behind Prometheus's 10 s
# timeout.
LIVE_TIMEOUT_MS = 5_000


class ScrapeError(RuntimeError):
    """Raised when the database could not be read for a scrape (the message names no URL or secret)."""


def read_engine(url: str) -> Engine:
    """An engine for reading only. On SQLite a deferred BEGIN (make_engine's BEGIN IMMEDIATE would take the
    write lock and stall the workers for every scrape); WAL lets the read go on beside them."""
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


T = TypeVar("T")


def read(engine: Engine, clock: Clock, what: Callable[[Connection, datetime], T], timeout_ms: int) -> T:
    """`what` in one read-only transaction (on PostgreSQL one REPEATABLE READ snapshot for all its queries)."""
    now = clock.now()
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout_ms)}"))
                return what(conn, now)
    except SQLAlchemyError as exc:
        # The driver's text can hold the host and the statement; the operator gets the kind, the log the rest.
        orig = getattr(exc, "orig", None) or exc
        raise ScrapeError(f"cannot read the database: {type(orig).__name__}") from exc


def read_live(engine: Engine, clock: Clock) -> queries.Live:
    return read(engine, clock, queries.read_live, LIVE_TIMEOUT_MS)


def read_history(engine: Engine, clock: Clock) -> queries.History:
    return read(engine, clock, queries.read_history, LIVE_TIMEOUT_MS)


def read_all(engine: Engine, clock: Clock) -> tuple[queries.Live, queries.History]:
    """Both in one snapshot: a scrape's figures agree with each other."""
    return read(
        engine,
        clock,
        lambda conn, now: (queries.read_live(conn, now), queries.read_history(conn, now)),
        LIVE_TIMEOUT_MS,
    )


def fold(engine: Engine) -> int:
    """Fold the metric deltas in a write transaction of its own (billing.services.metrics.fold)."""
    try:
        with engine.connect() as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"SET LOCAL statement_timeout = {int(LIVE_TIMEOUT_MS)}"))
            return queries.fold(conn)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        raise ScrapeError(f"cannot fold the metric deltas: {type(orig).__name__}") from exc


def families(live: queries.Live, history: queries.History) -> Iterator[Metric]:
    """The metric families of one scrape, with the documented names, help texts and labels."""
    yield from _live_families(live)
    yield from _history_families(history)


def _live_families(snap: queries.Live) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "billing_review_queue_items",
        "Invoices in review, waiting for an operator or a lookup.",
        value=snap.review_items,
    )
    yield GaugeMetricFamily(
        "billing_review_oldest_age_seconds",
        "How long the oldest invoice in review has waited (0 when the queue is empty).",
        value=snap.review_oldest_age_seconds,
    )
    yield GaugeMetricFamily(
        "billing_due_lag_seconds",
        "Age of the oldest owed work: a due period without its invoice, an open invoice past its due time, or a "
        "charge in flight past its lease (0 when none).",
        value=snap.due_lag_seconds,
    )

    paused = GaugeMetricFamily(
        "billing_paused", "1 while billing is paused, by reason (0 for the others).", labels=["reason"]
    )
    reasons = [r.value for r in PauseReason]
    if snap.paused_reason is not None and snap.paused_reason not in reasons:
        reasons.append(snap.paused_reason)
    for reason in reasons:
        paused.add_metric([reason], 1 if reason == snap.paused_reason else 0)
    yield paused

    nearest = GaugeMetricFamily(
        "billing_refund_nearest_deadline_seconds",
        "Seconds left before the void window closes on the nearest refund not yet done (absent when none).",
    )
    if snap.refund_nearest_deadline_seconds is not None:
        nearest.add_metric([], snap.refund_nearest_deadline_seconds)
    yield nearest

    last_run = GaugeMetricFamily(
        "billing_periodic_last_run_timestamp_seconds",
        "When each periodic task last ran (took its lease), as Unix time on the billing clock.",
        labels=["task"],
    )
    for task, at in sorted(snap.periodic_last_run.items()):
        last_run.add_metric([task], at.timestamp())
    yield last_run


def _history_families(snap: queries.History) -> Iterator[Metric]:
    invoices = GaugeMetricFamily("billing_invoices", "Invoices by state.", labels=["state"])
    for state, count in sorted(snap.invoices.items()):
        invoices.add_metric([state], count)
    yield invoices

    attempts = CounterMetricFamily(
        "billing_charge_attempts",
        "Finished charge attempts (approved, declined, duplicate, not_sent) by state, Tpaga errorCode and class.",
        labels=["state", "error_code", "decline_class"],
    )
    for (state, code, klass), count in sorted(snap.attempts.items()):
        attempts.add_metric([state, code, klass], count)
    yield attempts

    refunds = GaugeMetricFamily("billing_refunds", "Refunds (voids) by state.", labels=["state"])
    for state, count in sorted(snap.refunds.items()):
        refunds.add_metric([state], count)
    yield refunds
    yield CounterMetricFamily(
        "billing_recovered_invoices",
        "Invoices paid after at least one decline.",
        value=snap.recovered_invoices,
    )
    mrr = GaugeMetricFamily(
        "billing_mrr_minor_units",
        "Monthly recurring revenue of active and past_due subscriptions, in minor units of the currency.",
        labels=["currency"],
    )
    for currency, amount in sorted(snap.mrr_minor.items()):
        mrr.add_metric([currency], amount)
    yield mrr

    yield _per_endpoint(
        "billing_webhook_backlog",
        "Events not yet acknowledged by each webhook (or celery://) endpoint, by endpoint id.",
        snap.webhook_backlog,
    )
    yield _per_endpoint(
        "billing_webhook_endpoint_failing",
        "1 for an endpoint marked failing (its deliveries failed in a row; its backlog waits), 0 otherwise.",
        {endpoint: int(failing) for endpoint, failing in snap.webhook_failing.items()},
    )


def _per_endpoint(name: str, documentation: str, values: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=["endpoint"])
    for endpoint, value in sorted(values.items(), key=lambda item: int(item[0])):  # ids in numeric order
        family.add_metric([endpoint], value)
    return family


class BillingCollector(Collector):
    """Every figure read per scrape: a fold first (best effort: a failed fold is logged and the read still gives
    the right counts), then one read. Concurrent scrapes wait for each other rather than load the database
    twice."""

    def __init__(
        self,
        read: Callable[[], tuple[queries.Live, queries.History]],
        fold: Callable[[], int] | None = None,
    ) -> None:
        self._read = read
        self._fold = fold
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._fold is not None:
                try:
                    self._fold()
                except ScrapeError as exc:
                    log.warning("%s; reading the unfolded deltas", exc)
            live, history = self._read()
        return list(families(live, history))


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry holding only the business metrics (no process or Python metrics of the exporter itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def wsgi_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """Prometheus's WSGI app, answering 503 with a one-line reason when the database cannot be read."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return list(metrics_app(environ, start_response))
        except ScrapeError as exc:
            log.warning("scrape failed: %s", exc)
            start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{exc}\n".encode()]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # Prometheus scrapes every few seconds: no line per request


def make_http_server(host: str, port: int, registry: CollectorRegistry) -> ThreadingWSGIServer:
    server = make_server(host, port, wsgi_app(registry), ThreadingWSGIServer, handler_class=_QuietHandler)
    assert isinstance(server, ThreadingWSGIServer)
    return server
