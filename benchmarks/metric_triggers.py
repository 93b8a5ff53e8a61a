"""What the metric triggers of migration 0009 cost the write path, on PostgreSQL: the charge's state changes with
the triggers on and off, alternated, medians.

    .venv/bin/python benchmarks/metric_triggers.py                  # 5 pairs, 2,000 single charges + 20,000 batched
    .venv/bin/python benchmarks/metric_triggers.py --pairs 3 --single 500 --batched 5000   # a quick look

A fresh database `billing_bench_triggers` is migrated to head and loaded with open invoices and their pending
attempts (one subscription each). A charge is what the pipeline records when Tpaga approves: the invoice open ->
paid and its attempt pending -> approved (two counted state changes, two deltas' worth). Two shapes:
- single: one charge per transaction, two single-row UPDATEs (the per-invoice path: refunds, the review
  resolve, a charge_invoice message);
- batched: `--batch` charges per transaction, one multi-row UPDATE per table (billing.db.bulk's shape, what
  the charge pipeline records a batch's outcomes with);
- server loop: `--loop` charges as single-row UPDATEs in one PL/pgSQL loop, one transaction: no commit, no
  round trip, so what is left is the statements' own cost and the triggers' (the first two shapes measure what a
  client sees, where commits and the shared machine's noise dominate).
Each run takes fresh rows; "off" runs disable the triggers (ALTER TABLE ... DISABLE TRIGGER USER), "on" runs
enable them; the order alternates (off, on, on, off, ...) so that drift of the shared machine does not favour
one side. After the "on" runs, the maintained counts are checked against a GROUP BY.

Results: printed, and written to benchmarks/results/<UTC timestamp>-metric_triggers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from billing.db import migrate  # noqa: E402
from billing.services import metrics  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from metrics_scrape import drop_database, log, recreate_database  # noqa: E402

DATABASE = "billing_bench_triggers"
TABLES = ("invoices", "charge_attempts")
T0 = "2026-01-31 12:00:00+00"


def load(url: str, n: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for sql in (
            "INSERT INTO customers (id, tpaga_customer_id, merchant_customer_id, email, created_at) "
            f"VALUES (1, 'tc-1', 'm-1', 'a@example.com', '{T0}')",
            "INSERT INTO cards (id, customer_id, tpaga_card_id, brand, last_four, status, created_at) "
            f"VALUES (1, 1, 'card-1', 'VISA', '4242', 'usable', '{T0}')",
            "INSERT INTO plans (id, code, name, amount_minor, currency, interval, interval_count, trial_days, "
            f"created_at) VALUES (1, 'm', 'M', 3000000, 'COP', 'month', 1, 0, '{T0}')",
            "INSERT INTO subscriptions (id, customer_id, plan_id, card_id, status, anchor_at, next_period_index, "
            f"next_billing_at, created_at, updated_at) SELECT i, 1, 1, 1, 'active', '{T0}', 1, '{T0}', '{T0}', "
            f"'{T0}' FROM generate_series(1, :n) i",
            "INSERT INTO invoices (id, subscription_id, period_index, period_start, period_end, amount_minor, "
            f"currency, state, attempt_count, soft_failures, created_at, updated_at) SELECT i, i, 0, '{T0}', "
            f"'{T0}', 3000000, 'COP', 'open', 1, 0, '{T0}', '{T0}' FROM generate_series(1, :n) i",
            "INSERT INTO charge_attempts (id, invoice_id, attempt_number, order_id, card_id, amount_minor, "
            f"currency, state, created_at) SELECT i, i, 1, 'inv-' || i || '-1', 1, 3000000, 'COP', 'pending', "
            f"'{T0}' FROM generate_series(1, :n) i",
        ):
            conn.execute(text(sql), {"n": n})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


def set_triggers(engine: Any, on: bool) -> None:
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER USER"))


PAID = "UPDATE invoices SET state = 'paid', updated_at = now() WHERE id = ANY(:ids)"
APPROVED = "UPDATE charge_attempts SET state = 'approved', error_code = '00', finished_at = now() WHERE id = ANY(:ids)"


def run_single(engine: Any, first: int, n: int) -> float:
    """Seconds for n charges, one transaction each."""
    started = time.perf_counter()
    with engine.connect() as conn:
        for i in range(first, first + n):
            with conn.begin():
                conn.execute(text(PAID), {"ids": [i]})
                conn.execute(text(APPROVED), {"ids": [i]})
    return time.perf_counter() - started


def run_batched(engine: Any, first: int, n: int, batch: int) -> float:
    started = time.perf_counter()
    with engine.connect() as conn:
        for start in range(first, first + n, batch):
            ids = list(range(start, min(start + batch, first + n)))
            with conn.begin():
                conn.execute(text(PAID), {"ids": ids})
                conn.execute(text(APPROVED), {"ids": ids})
    return time.perf_counter() - started


def run_loop(engine: Any, first: int, n: int) -> float:
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(
                f"DO $$ BEGIN FOR i IN {int(first)}..{int(first + n - 1)} LOOP "
                "UPDATE invoices SET state = 'paid', updated_at = now() WHERE id = i; "
                "UPDATE charge_attempts SET state = 'approved', error_code = '00', finished_at = now() WHERE id = i; "
                "END LOOP; END $$"
            )
        )
    return time.perf_counter() - started


def check(engine: Any, total: int, counted: int) -> None:
    """The "off" runs changed states without deltas, so the counts must show exactly the "on" runs' charges."""
    with engine.connect() as conn:
        counts = metrics.maintained(conn, datetime.now(UTC))
    invoices = {k1: n for (m, k1, _, _), n in counts.items() if m == "invoices" and n}
    approved = sum(n for (m, k1, _, _), n in counts.items() if m == "attempts" and k1 == "approved")
    if invoices != {"open": total - counted, "paid": counted} or approved != counted:
        raise SystemExit(f"the triggers missed changes: {invoices}, {approved} approved; {counted} expected")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="off/on pairs of runs per shape")
    parser.add_argument("--single", type=int, default=2000, help="charges per single-transaction run")
    parser.add_argument("--batched", type=int, default=20000, help="charges per batched run")
    parser.add_argument("--loop", type=int, default=10000, help="charges per server-loop run")
    parser.add_argument("--batch", type=int, default=100, help="charges per transaction in the batched runs")
    args = parser.parse_args()
    now = datetime.now(UTC).replace(microsecond=0)
    runs = 2 * args.pairs
    total = runs * (args.single + args.batched + args.loop)
    url = recreate_database(DATABASE)
    results: dict[str, Any] = {
        "started_at": now.isoformat(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "args": vars(args),
    }
    try:
        migrate.upgrade(url)
        load(url, total)
        log(f"loaded {total:,} open invoices with pending attempts")
        engine = create_engine(url)
        with engine.connect() as conn:
            results["postgresql"] = conn.execute(text("SHOW server_version")).scalar_one()
        samples: dict[str, dict[str, list[float]]] = {
            shape: {"off": [], "on": []} for shape in ("single", "batched", "loop")
        }
        first = 1
        for r in range(runs):
            on = r % 4 in (1, 2)  # off, on, on, off, off, on, ...
            side = "on" if on else "off"
            set_triggers(engine, on)
            seconds = run_single(engine, first, args.single)
            first += args.single
            samples["single"][side].append(seconds / args.single * 1e6 / 2)  # µs per state change
            seconds = run_batched(engine, first, args.batched, args.batch)
            first += args.batched
            samples["batched"][side].append(seconds / args.batched * 1e6 / 2)
            seconds = run_loop(engine, first, args.loop)
            first += args.loop
            samples["loop"][side].append(seconds / args.loop * 1e6 / 2)
            log(
                f"run {r + 1} triggers {side}: single {samples['single'][side][-1]:.1f} µs, "
                f"batched {samples['batched'][side][-1]:.1f} µs, server loop {samples['loop'][side][-1]:.1f} µs "
                "per state change"
            )
        set_triggers(engine, True)
        check(engine, total, args.pairs * (args.single + args.batched + args.loop))
        summary = {}
        for shape, sides in samples.items():
            off, on = statistics.median(sides["off"]), statistics.median(sides["on"])
            summary[shape] = {
                "off_us": round(off, 1),
                "on_us": round(on, 1),
                "extra_us": round(on - off, 1),
                "ratio": round(on / off, 3),
                "runs": {k: [round(v, 1) for v in vs] for k, vs in sides.items()},
            }
            log(f"{shape}: off {off:.1f} µs, on {on:.1f} µs per state change (x{on / off:.2f})")
        results["summary"] = summary
        engine.dispose()
    finally:
        drop_database(DATABASE)
    results["load_average_after"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / f"{now.strftime('%Y%m%dT%H%M%SZ')}-metric_triggers.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
