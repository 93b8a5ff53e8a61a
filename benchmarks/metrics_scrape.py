"""What a Prometheus scrape of `billing metrics serve` costs with 1,000,000 subscriptions in PostgreSQL.

    .venv/bin/python benchmarks/metrics_scrape.py                      # 1,000,000 subscriptions, 3 periods each
    .venv/bin/python benchmarks/metrics_scrape.py --subscriptions 100000 --scrapes 11   # a quick look
    .venv/bin/python benchmarks/metrics_scrape.py --keep               # keep the database for EXPLAIN by hand

A fresh database `billing_bench_metrics` is migrated and bulk-loaded server-side (INSERT ... SELECT over
generate_series, one statement per table): customers with a card each, subscriptions on four plans in every
status (0.1% due now, a few paused), `--periods` invoices per subscription (paid, open in dunning, in review,
uncollectible, void), their attempts (approved, declined with several errorCodes, recovered after a decline,
unknown, not_sent, in flight), refunds of 0.5% of the charges, and a lease per periodic task. Then VACUUM
ANALYZE, as autovacuum would have done on a live database (index-only scans need the visibility map).

The load runs at revision 0008 (the one before 0009); then `billing db upgrade` to 0009 is timed (the backfill
of metric_totals: one scan of each counted table) and the maintained counts are checked against a fresh GROUP BY
of the tables.

Timed, each the median of `--scrapes` runs after one warm-up:
- every query of billing.services.metrics alone (its own read-only transaction), with its EXPLAIN ANALYZE;
- the live read and the maintained counts (billing.metrics.read_live, read_history), the latter also with
  `--deltas` unfolded deltas (an exporter that may not fold), and the fold of that many deltas;
- GET /metrics of a real `billing metrics serve` subprocess (what Prometheus sees: a fold, then one read).

Results: printed, and written to benchmarks/results/<UTC timestamp>-metrics_scrape.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, event, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from billing.clock import SystemClock  # noqa: E402
from billing.db import migrate  # noqa: E402
from billing.metrics import fold, read_engine, read_history, read_live  # noqa: E402
from billing.services import metrics as queries  # noqa: E402
from tasks.testing import free_port, process_env  # noqa: E402

BILLING = str(Path(sys.executable).parent / "billing")
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/"
DATABASE = "billing_bench_metrics"
BUDGET_MS = 100.0


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def recreate_database(name: str) -> str:
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_BASE + name


def drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# --- loading ------------------------------------------------------------------------------------------------

# h = a pseudo-random 0..999 per invoice; the last period of a subscription is where open, review and void
# invoices live (earlier ones are settled). Shares: see the module docstring.
LOAD = [
    (
        "plans",
        """INSERT INTO plans (id, code, name, amount_minor, currency, interval, interval_count, trial_days, created_at)
        VALUES (1, 'm-cop', 'Monthly COP', 4500000, 'COP', 'month', 1, 0, :now),
               (2, 'y-cop', 'Yearly COP', 45000000, 'COP', 'year', 1, 0, :now),
               (3, 'm-usd', 'Monthly USD', 1500, 'USD', 'month', 1, 0, :now),
               (4, 'w-cop', 'Weekly COP', 1200000, 'COP', 'week', 1, 0, :now)""",
    ),
    (
        "customers",
        """INSERT INTO customers (id, tpaga_customer_id, email, created_at)
        SELECT g, 'cus-' || g, 'c' || g || '@example.com', :now FROM generate_series(1, :n) g""",
    ),
    (
        "cards",
        """INSERT INTO cards (id, customer_id, tpaga_card_id, brand, last_four, exp_month, exp_year, status, created_at)
        SELECT g, g, 'card-' || g, 'VISA', '1111', 12, 2031,
               CASE WHEN g % 50 = 0 THEN 'unusable' ELSE 'usable' END, :now
        FROM generate_series(1, :n) g""",
    ),
    (
        "subscriptions",
        """INSERT INTO subscriptions (id, customer_id, plan_id, card_id, status, anchor_at, next_period_index,
               next_billing_at, current_period_start, current_period_end, canceled_at, paused_at, created_at,
               updated_at)
        SELECT g, g, CASE g % 10 WHEN 7 THEN 2 WHEN 8 THEN 3 WHEN 9 THEN 4 ELSE 1 END, g, s.status,
               CAST(:now AS timestamptz) - :p * interval '30 days' - (g % 86400) * interval '1 second', :p,
               CASE WHEN s.status IN ('unpaid', 'canceled') OR g % 500 = 3 THEN NULL
                    WHEN g <= :n / 1000 THEN CAST(:now AS timestamptz) - (g % 600) * interval '1 second'
                    ELSE CAST(:now AS timestamptz) + (60 + g % 2592000) * interval '1 second' END,
               CAST(:now AS timestamptz) - interval '30 days', CAST(:now AS timestamptz),
               CASE WHEN s.status = 'canceled' THEN CAST(:now AS timestamptz) - interval '3 days' END,
               CASE WHEN g % 500 = 3 AND s.status = 'active' THEN CAST(:now AS timestamptz) - interval '1 day' END,
               :now, :now
        FROM generate_series(1, :n) g,
             LATERAL (SELECT CASE WHEN g % 100 < 85 THEN 'active' WHEN g % 100 < 90 THEN 'trialing'
                                  WHEN g % 100 < 94 THEN 'past_due' WHEN g % 100 < 96 THEN 'unpaid'
                                  ELSE 'canceled' END AS status) s""",
    ),
    (
        "invoices",
        """INSERT INTO invoices (id, subscription_id, period_index, period_start, period_end, amount_minor, currency,
               state, due_at, attempt_count, soft_failures, first_failure_at, last_error_code, review_reason,
               paid_at, created_at, updated_at)
        SELECT i, g, k,
               CAST(:now AS timestamptz) - (:p - k) * interval '30 days',
               CAST(:now AS timestamptz) - (:p - k - 1) * interval '30 days', 4500000, 'COP', st.state,
               CASE WHEN st.state = 'open' THEN
                    CASE WHEN h < 903 THEN CAST(:now AS timestamptz) - h * interval '1 second'
                         ELSE CAST(:now AS timestamptz) + (h % 5 + 1) * interval '1 day' END END,
               0, CASE WHEN st.failed THEN 1 ELSE 0 END,
               CASE WHEN st.failed THEN CAST(:now AS timestamptz) - interval '2 days' END,
               CASE WHEN st.failed THEN (ARRAY['51', '05', '14', '54', '61'])[1 + h % 5] END,
               CASE WHEN st.state = 'review' THEN 'answer lost' END,
               CASE WHEN st.state = 'paid' THEN CAST(:now AS timestamptz) - (:p - k) * interval '30 days' END,
               CAST(:now AS timestamptz) - (:p - k) * interval '30 days',
               CAST(:now AS timestamptz) - (h % 3600) * interval '1 second'
        FROM generate_series(1, :n) g, generate_series(0, :p - 1) k,
             LATERAL (SELECT (g - 1) * :p + k + 1 AS i, ((CAST(g AS bigint) * 7919 + k * 104729) % 1000) AS h) x,
             LATERAL (SELECT CASE
                        WHEN k < :p - 1 THEN CASE WHEN h < 950 THEN 'paid' ELSE 'uncollectible' END
                        WHEN h < 900 THEN 'paid' WHEN h < 940 THEN 'open' WHEN h < 970 THEN 'uncollectible'
                        WHEN h < 990 THEN 'void' WHEN h < 991 THEN 'review' ELSE 'paid' END AS state,
                      (h % 20 = 0 OR h >= 940 AND h < 970 OR k < :p - 1 AND h >= 950
                       OR k = :p - 1 AND h >= 920 AND h < 940) AS failed) st""",
    ),
    (
        "attempts: the first of each charged invoice",
        """INSERT INTO charge_attempts (invoice_id, attempt_number, order_id, card_id, amount_minor, currency, state,
               tpaga_charge_id, error_code, decline_class, http_status, lease_expires_at, created_at, sent_at,
               finished_at, approved_at)
        SELECT v.id, 1, 'o-' || v.id || '-1', v.subscription_id, v.amount_minor, v.currency, a.state,
               CASE WHEN a.state IN ('approved', 'declined') THEN 'ch-' || v.id || '-1' END,
               a.code, a.klass, CASE WHEN a.state = 'approved' THEN 201 WHEN a.state = 'declined' THEN 402 END,
               CASE WHEN a.state = 'sending' THEN CAST(:now AS timestamptz) + interval '200 seconds' END,
               v.created_at, v.created_at, CASE WHEN a.state NOT IN ('sending', 'unknown') THEN v.created_at END,
               CASE WHEN a.state = 'approved' THEN v.created_at END
        FROM invoices v,
             LATERAL (SELECT CASE WHEN v.state = 'review' THEN 'unknown'
                                  WHEN v.last_error_code IS NOT NULL THEN 'declined'
                                  WHEN v.state = 'paid' AND v.id % 997 = 5 THEN 'not_sent'
                                  WHEN v.state = 'paid' THEN 'approved'
                                  ELSE 'sending' END AS state) s,
             LATERAL (SELECT s.state,
                             CASE s.state WHEN 'approved' THEN '00' WHEN 'declined' THEN v.last_error_code END AS code,
                             CASE s.state WHEN 'approved' THEN 'approved' WHEN 'unknown' THEN 'unknown'
                                  WHEN 'declined' THEN CASE WHEN v.last_error_code IN ('14', '54') THEN 'hard'
                                                            ELSE 'soft' END END AS klass) a
        WHERE v.state IN ('paid', 'uncollectible', 'review')
           OR v.state = 'open' AND (v.last_error_code IS NOT NULL OR v.id % 40 = 1)""",
    ),
    (
        "attempts: the retries (approved after a decline, declined again)",
        """INSERT INTO charge_attempts (invoice_id, attempt_number, order_id, card_id, amount_minor, currency, state,
               tpaga_charge_id, error_code, decline_class, http_status, created_at, sent_at, finished_at,
               approved_at)
        SELECT v.id, 2, 'o-' || v.id || '-2', v.subscription_id, v.amount_minor, v.currency,
               CASE WHEN v.state = 'paid' THEN 'approved' ELSE 'declined' END, 'ch-' || v.id || '-2',
               CASE WHEN v.state = 'paid' THEN '00' ELSE '51' END,
               CASE WHEN v.state = 'paid' THEN 'approved' ELSE 'soft' END,
               CASE WHEN v.state = 'paid' THEN 201 ELSE 402 END, v.updated_at, v.updated_at, v.updated_at,
               CASE WHEN v.state = 'paid' THEN v.updated_at END
        FROM invoices v WHERE v.last_error_code IS NOT NULL AND v.state IN ('paid', 'uncollectible')""",
    ),
    (
        "refunds",
        """INSERT INTO refunds (charge_attempt_id, invoice_id, reason, state, deadline_at, requested_at, finished_at)
        SELECT a.id, a.invoice_id, 'customer asked', CASE WHEN a.invoice_id % 20000 = 7 THEN 'requested'
               ELSE 'voided' END,
               CASE WHEN a.invoice_id % 20000 = 7 THEN CAST(:now AS timestamptz) + (a.id % 86400) * interval '1 second'
                    ELSE a.finished_at + interval '24 hours' END,
               a.finished_at, CASE WHEN a.invoice_id % 20000 <> 7 THEN a.finished_at + interval '1 minute' END
        FROM charge_attempts a WHERE a.state = 'approved' AND a.invoice_id % 200 = 7""",
    ),
    (
        "leases",
        """INSERT INTO control (key, value, updated_at)
        SELECT 'lease:' || t, 'bench', CAST(:now AS timestamptz) - interval '3 seconds'
        FROM unnest(CAST(:tasks AS text[])) t""",
    ),
]


def load(url: str, subscriptions: int, periods: int, now: datetime) -> dict[str, Any]:
    from billing.task_names import PERIODIC_TASKS

    engine = create_engine(url)
    counts: dict[str, Any] = {}
    started = time.monotonic()
    params = {"n": subscriptions, "p": periods, "now": now, "tasks": list(PERIODIC_TASKS)}
    for what, sql in LOAD:
        step = time.monotonic()
        with engine.begin() as conn:
            rows = conn.execute(text(sql), params).rowcount
        log(f"loaded {what}: {rows:,} rows in {time.monotonic() - step:.1f} s")
    with engine.begin() as conn:
        for table in ("customers", "cards", "subscriptions", "invoices", "charge_attempts", "refunds"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
            counts[table] = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
    counts["load_seconds"] = round(time.monotonic() - started, 1)
    step = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    counts["vacuum_analyze_seconds"] = round(time.monotonic() - step, 1)
    engine.dispose()
    return counts


# --- timing -------------------------------------------------------------------------------------------------


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def time_queries(engine: Engine, runs: int) -> dict[str, Any]:
    """Each query alone, in its own read-only transaction; its statements EXPLAIN ANALYZEd once."""
    out: dict[str, Any] = {}
    clock = SystemClock()
    for name, query in {**queries.LIVE_QUERIES, **queries.HISTORY_QUERIES}.items():
        samples = []
        for _ in range(runs + 1):
            with engine.connect() as conn, conn.begin():
                started = time.perf_counter()
                query(conn, clock.now())
                samples.append(time.perf_counter() - started)
        statements: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            statements.append((statement, parameters))  # noqa: B023 - bound per query on purpose

        event.listen(engine, "before_cursor_execute", capture)
        with engine.connect() as conn, conn.begin():
            query(conn, clock.now())
        event.remove(engine, "before_cursor_execute", capture)
        plans = []
        with engine.connect() as conn, conn.begin():
            for statement, parameters in statements:
                rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).all()
                plans.append([row[0] for row in rows])
        tier = "live" if name in queries.LIVE_QUERIES else "history"
        out[name] = {
            "tier": tier,
            "median_ms": median_ms(samples[1:]),
            "max_ms": round(max(samples[1:]) * 1000, 2),
            "plans": plans,
        }
        log(f"query {name} ({tier}): median {out[name]['median_ms']} ms")
    return out


def time_reads(engine: Engine, runs: int, read: Any) -> dict[str, Any]:
    """`read` as the exporter runs it (one read-only snapshot)."""
    clock = SystemClock()
    samples = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        read(engine, clock)
        samples.append(time.perf_counter() - started)
    return {"median_ms": median_ms(samples[1:]), "max_ms": round(max(samples[1:]) * 1000, 2)}


def time_http(url: str, runs: int, workdir: Path) -> dict[str, Any]:
    """GET /metrics of a real exporter process, as Prometheus does."""
    port = free_port()
    log_path = workdir / "metrics-serve.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [BILLING, "metrics", "serve", "--port", str(port)],
            env=process_env({"DATABASE_URL": url}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        endpoint = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(endpoint, timeout=30)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"billing metrics serve did not start:\n{log_path.read_text()}") from None
                time.sleep(0.2)
        samples, size = [], 0
        with requests.Session() as http:
            for _ in range(runs + 1):
                started = time.perf_counter()
                response = http.get(endpoint, timeout=30)
                samples.append(time.perf_counter() - started)
                response.raise_for_status()
                size = len(response.content)
        series = sum(1 for line in response.text.splitlines() if line and not line.startswith("#"))
        return {
            "median_ms": median_ms(samples[1:]),
            "max_ms": round(max(samples[1:]) * 1000, 2),
            "bytes": size,
            "series": series,
            "body": response.text,
        }
    finally:
        proc.terminate()
        proc.wait(10)


TRUTH = {
    "invoices": "SELECT state, count(*) FROM invoices GROUP BY state",
    "refunds": "SELECT state, count(*) FROM refunds GROUP BY state",
    "attempts": "SELECT state, count(*) FROM charge_attempts "
    "WHERE state IN ('approved', 'declined', 'duplicate', 'not_sent') GROUP BY state",
    "recovered": "SELECT 'all', count(*) FROM invoices WHERE state = 'paid' AND last_error_code IS NOT NULL",
}


def check_counts(engine: Engine) -> dict[str, Any]:
    """The maintained counts against the whole-table GROUP BYs they replace (scans, untimed)."""
    history = read_history(engine, SystemClock())
    attempts: dict[str, int] = {}
    for (state, _, _), n in history.attempts.items():
        attempts[state] = attempts.get(state, 0) + n
    maintained = {
        "invoices": {k: v for k, v in history.invoices.items() if v},
        "refunds": {k: v for k, v in history.refunds.items() if v},
        "attempts": attempts,
        "recovered": {"all": history.recovered_invoices},
    }
    with engine.connect() as conn:
        truth = {name: {str(k): int(n) for k, n in conn.execute(text(sql))} for name, sql in TRUTH.items()}
    if maintained != truth:
        raise SystemExit(f"maintained counts differ from the tables: {maintained} vs {truth}")
    return {"equal": True, "counts": maintained}


def add_deltas(url: str, n: int) -> None:
    """n unfolded deltas that cancel out, spread over the label sets a billing run writes."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO metric_deltas (metric, k1, k2, k3, delta) "
                "SELECT 'invoices', (ARRAY['open', 'paid', 'review'])[1 + i % 3], '', '', "
                "CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END FROM generate_series(1, :n) i"
            ),
            {"n": n - n % 6},
        )
    engine.dispose()


def time_fold(url: str) -> dict[str, Any]:
    engine = create_engine(url)
    started = time.perf_counter()
    moved = fold(engine)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {"moved": moved, "ms": round(elapsed * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscriptions", type=int, default=1_000_000)
    parser.add_argument("--periods", type=int, default=3, help="invoices per subscription")
    parser.add_argument("--scrapes", type=int, default=21, help="timed runs of each measure (median reported)")
    parser.add_argument("--keep", action="store_true", help=f"keep the database {DATABASE} afterwards")
    parser.add_argument("--reuse", action="store_true", help=f"time the existing {DATABASE} without loading it")
    parser.add_argument("--deltas", type=int, default=20_000, help="unfolded deltas for the no-fold read")
    args = parser.parse_args()

    now = datetime.now(UTC).replace(microsecond=0)
    results: dict[str, Any] = {
        "started_at": now.isoformat(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "subscriptions": args.subscriptions,
        "periods": args.periods,
        "scrapes": args.scrapes,
    }
    url = PG_BASE + DATABASE
    try:
        if not args.reuse:
            url = recreate_database(DATABASE)
            migrate.upgrade(url, "0008")
            results["rows"] = load(url, args.subscriptions, args.periods, now)
            log(f"rows: {results['rows']}")
            started = time.monotonic()
            migrate.upgrade(url)
            results["upgrade_0009_seconds"] = round(time.monotonic() - started, 1)
            log(f"upgrade to 0009 (backfill): {results['upgrade_0009_seconds']} s")
        with create_engine(PG_ADMIN).connect() as conn:
            results["postgresql"] = conn.execute(text("SHOW server_version")).scalar_one()
        engine = read_engine(url)
        results["check"] = check_counts(engine)
        log(f"maintained counts equal the tables' GROUP BY: {results['check']['counts']}")
        results["queries"] = time_queries(engine, args.scrapes)
        results["live_read"] = time_reads(engine, args.scrapes, read_live)
        log(f"live read: median {results['live_read']['median_ms']} ms")
        results["counts_read"] = time_reads(engine, args.scrapes, read_history)
        log(f"maintained counts read, folded: median {results['counts_read']['median_ms']} ms")
        add_deltas(url, args.deltas)
        results["counts_read_unfolded"] = {"deltas": args.deltas, **time_reads(engine, args.scrapes, read_history)}
        log(f"... with {args.deltas} unfolded deltas: median {results['counts_read_unfolded']['median_ms']} ms")
        results["fold"] = time_fold(url)
        log(f"fold of {results['fold']['moved']} deltas: {results['fold']['ms']} ms")
        engine.dispose()
        workdir = ROOT / "bench-results"
        workdir.mkdir(exist_ok=True)
        results["http"] = time_http(url, args.scrapes, workdir)
        log(
            f"GET /metrics: median {results['http']['median_ms']} ms, {results['http']['series']} series, "
            f"{results['http']['bytes']} bytes (budget {BUDGET_MS:.0f} ms)"
        )
    finally:
        if not args.keep and not args.reuse:
            drop_database(DATABASE)
    results["load_average_after"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / f"{now.strftime('%Y%m%dT%H%M%SZ')}-metrics_scrape.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
