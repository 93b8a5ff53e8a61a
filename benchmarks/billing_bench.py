"""End-to-end billing benchmark: billed charges per second on this machine, with real processes.

    .venv/bin/python benchmarks/billing_bench.py                    # 20,000 charges per run, 3 runs per scenario
    .venv/bin/python benchmarks/billing_bench.py --full             # 100,000 charges per run
    .venv/bin/python benchmarks/billing_bench.py --subscriptions 5000 --runs 1   # a quick look
    .venv/bin/python benchmarks/billing_bench.py --only noop,naive  # a subset of the sections

Everything runs on this machine, with every safety setting of the product on: PostgreSQL (a fresh
database `billing_bench`), Redis as the broker (a free database number, claimed like the tests do), the Tpaga
emulator (`billing sandbox`, its latency set per scenario), `celery -A tasks worker` started WITHOUT pool or
concurrency options (the app's own defaults) and `celery -A tasks beat` (open interval 1 s).

Sections (each printed, and all written to `bench-results/<UTC timestamp>.json`):

- end to end: N subscriptions seeded straight into the database (one emulator card per K subscriptions; each
  subscription is still its own invoice and its own charge) become due at one instant; the clock runs from the
  beat tick that finds them (the earliest invoice's created_at) to the last recorded outcome (the latest
  attempt's finished_at). Latency p50/p99 is due time -> recorded outcome per charge. For each emulator latency
  (0, 50, 300 ms) and 1 and 2 worker processes, several runs, medians reported; every run is checked (every
  invoice paid with one approved attempt, the emulator approved exactly as many charges).
- the single path for comparison: the same with BILLING_CHARGE_BATCH_SIZE=1 (one billing.charge_invoice
  message per charge), one run.
- the global rate limit: TPAGA_RATE_LIMIT set, two workers, no latency: the achieved rate and the busiest
  second at the emulator (from its ledger).
- Celery's no-op ceiling: a worker with the same settings draining a queue of no-op tasks on the same broker.
- the seed blog's naive loop: one `requests.post` charge after another against the same emulator.
- finding due work: 10,000 due subscriptions among 1,000,000 (PostgreSQL and SQLite), EXPLAIN of the scan,
  the time to claim them all, and the time to open their invoices (the real work beat does).
- memory: the RSS of the one-worker process at start, after warm-up, and after every charge it made.

Other programs running on the machine skew the figures: the JSON records the load average and how much CPU
went to processes that are not part of the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from billing.gateway.ratelimit import default_burst  # noqa: E402
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY  # noqa: E402
from tasks.testing import CeleryProcess, private_redis_db, process_env  # noqa: E402

BILLING = str(Path(sys.executable).parent / "billing")
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/"
REDIS = "redis://127.0.0.1:6379/0"
TERMINAL = "('approved', 'declined', 'unknown', 'not_sent')"
SECTIONS = ("e2e", "profile", "single", "ratelimit", "noop", "naive", "scan", "memory")


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# --- machine and process accounting -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pids_named(name: str, cmdline_has: str | None = None) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != name:
                continue
            if cmdline_has and cmdline_has not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def pg_server_pids() -> list[int]:
    """PostgreSQL's own processes: the postmaster and its helpers, not the client backends."""
    found = []
    for pid in pids_named("postgres"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "(" not in cmdline:  # a backend's title ends with the client's address and port
            found.append(pid)
    return found


def machine_busy_seconds() -> float:
    """CPU seconds spent by all processes on all cores since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds of named groups of processes between start() and stop(), and of the whole machine."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._busy = 0.0
        self._wall = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._sample()
        self._busy = machine_busy_seconds()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        used = {
            name: round(sum(cpu - self._start[name].get(pid, 0.0) for pid, cpu in pids.items()), 2)
            for name, pids in end.items()
        }
        wall = time.monotonic() - self._wall
        busy = machine_busy_seconds() - self._busy
        used["machine"] = round(busy, 2)
        used["not_benchmark"] = round(max(0.0, busy - sum(v for k, v in used.items() if k != "machine")), 2)
        used["wall"] = round(wall, 2)
        return used


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(total_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --- the services under test --------------------------------------------------------------------------------


class Emulator:
    """`billing sandbox` in a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [BILLING, "sandbox", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=process_env({}),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+/api/)", line)
        if not match:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.api_url = match.group(1)
        self.base_url = self.api_url[: -len("api/")]

    def set_latency(self, ms: int) -> None:
        requests.post(self.base_url + "__sandbox/faults", json={"latencyMs": ms}, timeout=10).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(requests.get(self.base_url + "__sandbox/stats", timeout=30).json())

    def ledger_times(self) -> list[datetime]:
        charges = requests.get(self.base_url + "__sandbox/ledger", timeout=120).json()["charges"]
        return [datetime.fromisoformat(c["dateCreated"]) for c in charges]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Receiver:
    """`benchmarks/webhook_receiver.py` in a child process: a webhook endpoint answering after a fixed latency."""

    def __init__(self, latency_ms: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "webhook_receiver.py"), "--latency-ms", str(latency_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(http://\S+/hook)", line)
        if not match:
            raise RuntimeError(f"the webhook receiver did not start: {line!r}")
        self.url = match.group(1)
        self.base_url = self.url[: -len("hook")]

    def distinct(self) -> int:
        return int(requests.get(self.base_url + "__stats", timeout=30).json()["distinct"])

    def arrivals(self) -> dict[str, float]:
        return dict(requests.get(self.base_url + "__arrivals", timeout=120).json())

    def register(self, db_url: str) -> None:
        """`billing webhooks add` for every event type, as an operator would."""
        subprocess.run(
            [BILLING, "webhooks", "add", self.url],
            env=process_env({"DATABASE_URL": db_url}),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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


def seed_cards(api_url: str, count: int) -> list[tuple[str, str, str, int]]:
    """`count` customers with an approving card each at the emulator: (customer id, card id, last four, year)."""
    from billing.gateway import TpagaClient

    client = TpagaClient(api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    numbers = ("4111111111111111", "4242424242424242", "5500000000000004")

    def one(i: int) -> tuple[str, str, str, int]:
        customer = client.create_customer(email=f"bench{i}@example.com", merchant_customer_id=f"bench-{i}")
        number = numbers[i % len(numbers)]
        token = client.tokenize_card(number=number, exp_month=12, exp_year=2035, holder_name=f"Bench {i}")
        card = client.associate_card(customer.id, token)
        return customer.id, card.id, number[-4:], 2035

    with ThreadPoolExecutor(16) as pool:
        cards = list(pool.map(one, range(count)))
    client.close()
    return cards


def seed_database(url: str, cards: list[tuple[str, str, str, int]], subscriptions: int) -> int:
    """Customers and cards as the emulator made them, one plan, and `subscriptions` subscriptions spread over
    the cards (none due yet); returns the plan id."""
    from billing.bootstrap import build_context
    from billing.config import Settings
    from billing.domain.money import Money
    from billing.services import catalog

    ctx = build_context(Settings(database_url=url, tpaga_private_key=DEFAULT_PRIVATE_KEY), gateway=object())  # type: ignore[arg-type]
    # A daily plan: run r bills period r of every subscription (anchored r days before it is due), so each run
    # opens new invoices and the earlier runs' paid ones stay, as a real history does.
    plan_id = catalog.create_plan(
        ctx, code="bench", name="Bench daily", amount=Money.from_major("45000", "COP"), interval="day"
    )
    ctx.sessions.kw["bind"].dispose()
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, tpaga_customer_id, merchant_customer_id, email, created_at) "
                "VALUES (:id, :tpaga, :merchant, :email, :now)"
            ),
            [
                {"id": n, "tpaga": c, "merchant": f"bench-{n}", "email": f"bench{n}@example.com", "now": now}
                for n, (c, _, _, _) in enumerate(cards, 1)
            ],
        )
        conn.execute(
            text(
                "INSERT INTO cards (id, customer_id, tpaga_card_id, brand, last_four, exp_month, exp_year, status,"
                " created_at) VALUES (:id, :id, :card, 'VISA', :four, 12, :year, 'usable', :now)"
            ),
            [
                {"id": n, "card": card, "four": four, "year": year, "now": now}
                for n, (_, card, four, year) in enumerate(cards, 1)
            ],
        )
        conn.execute(
            text(
                "INSERT INTO subscriptions (customer_id, plan_id, card_id, status, anchor_at, next_period_index,"
                " next_billing_at, created_at, updated_at)"
                " SELECT 1 + (g - 1) % :cards, :plan, 1 + (g - 1) % :cards, 'active', :now, 0, NULL, :now, :now"
                " FROM generate_series(1, :n) g"
            ),
            {"cards": len(cards), "plan": plan_id, "now": now, "n": subscriptions},
        )
        for table in ("customers", "cards", "subscriptions"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    return plan_id


class Schedule:
    """Makes subscriptions due, one new period per run, keeping the earlier periods' rows as history."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.period = 0

    def next_run(self, due: datetime, count: int) -> None:
        """The first `count` subscriptions' next period starts at `due`; the others do not renew."""
        self.period += 1
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM control WHERE key = 'billing_paused'"))
            conn.execute(
                text(
                    "UPDATE subscriptions SET next_period_index = :k, status = 'active',"
                    " anchor_at = CAST(:due AS timestamptz) - :k * interval '1 day',"
                    " next_billing_at = CASE WHEN id <= :count THEN CAST(:due AS timestamptz) END, updated_at = :due"
                ),
                {"due": due, "count": count, "k": self.period},
            )

    def vacuum(self) -> None:
        """What autovacuum does between bursts (it is off on this machine's shared server)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE subscriptions, invoices, charge_attempts, events, outbox"))
            # The stream's tables, where they exist (not before the stream: the A side of an A/B).
            for table in ("stream_events", "deliveries"):
                if conn.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is not None:
                    conn.execute(text(f"VACUUM ANALYZE {table}"))


# --- end to end ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """Workers and a beat on one database, broker and emulator."""

    db_url: str
    broker: str
    emulator: Emulator
    logs: Path
    receiver: Receiver | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    # A worker of its own consumes billing.events (the event stream's delivery loop) and the charging workers
    # consume every other queue: the deployment of docs/operations.md, "A delivery process of its own".
    delivery_process: bool = False
    workers: list[CeleryProcess] = field(default_factory=list)
    delivery: CeleryProcess | None = None
    beat: CeleryProcess | None = None

    def env(self) -> dict[str, str]:
        return process_env(
            {
                "DATABASE_URL": self.db_url,
                "CELERY_BROKER_URL": self.broker,
                "TPAGA_API_URL": self.emulator.api_url,
                "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
                "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
                "BILLING_BEAT_OPEN_SECONDS": "1",
                **self.extra_env,
            }
        )

    def start(self, workers: int, tag: str) -> None:
        from tasks.config import EVENTS, QUEUE_NAMES

        env = self.env()
        charging = ["-Q", ",".join(q for q in QUEUE_NAMES if q != EVENTS)] if self.delivery_process else []
        for n in range(workers):
            # No --pool, --concurrency or --prefetch: the app's own settings are what is measured.
            args = ["worker", "--loglevel", "INFO", "-n", f"bench{n}-{tag}@%h", "--without-mingle", "--without-gossip"]
            args += self.worker_args + charging
            self.workers.append(CeleryProcess(args, env, self.logs / f"worker-{tag}-{n}.log").start())
        if self.delivery_process:
            args = ["worker", "--loglevel", "INFO", "-n", f"events-{tag}@%h", "--without-mingle", "--without-gossip"]
            self.delivery = CeleryProcess([*args, "-Q", EVENTS], env, self.logs / f"events-{tag}.log").start()
        for proc in [*self.workers, *([self.delivery] if self.delivery else [])]:
            proc.wait_for_log(r"ready\.", 60)
        schedule = self.logs / f"beat-{tag}.schedule"
        self.beat = CeleryProcess(
            ["beat", "--loglevel", "INFO", "-s", str(schedule)], env, self.logs / f"beat-{tag}.log"
        ).start()
        self.beat.wait_for_log(r"beat: Starting", 30)

    def worker_pids(self) -> list[int]:
        return [p.proc.pid for p in self.workers if p.proc is not None]

    def stop(self) -> None:
        if self.beat is not None:
            self.beat.stop()
            self.beat = None
        for proc in self.workers:
            proc.stop(30)
        self.workers = []
        if self.delivery is not None:
            self.delivery.stop(30)
            self.delivery = None


def cpu_meter(stack: Stack) -> CpuMeter:
    return CpuMeter(
        {
            "workers": stack.worker_pids,
            # The delivery process (--delivery-process), metered apart from the charging workers: "workers" is
            # then the cost of charging and of emitting events, "delivery" the cost of delivering them.
            "delivery": lambda: [stack.delivery.proc.pid] if stack.delivery and stack.delivery.proc else [],
            "beat": lambda: [stack.beat.proc.pid] if stack.beat and stack.beat.proc else [],
            "emulator": lambda: [stack.emulator.proc.pid],
            # This benchmark's backends (the command line names the database) and the server's own processes
            # (WAL writer, checkpointer...), which work for every database: other users' backends are not counted.
            # (--database names it: a fixed " billing_bench " missed every backend of another name.)
            "postgres": lambda: pids_named("postgres", f" {make_url(stack.db_url).database} ") + pg_server_pids(),
            "redis": lambda: pids_named("redis-server", ":6379"),
            "bench": lambda: [os.getpid()],
            "receiver": lambda: [stack.receiver.proc.pid] if stack.receiver else [],
        }
    )


def e2e_run(stack: Stack, schedule: Schedule, count: int, timeout_seconds: float) -> dict[str, Any]:
    """One run: `count` subscriptions due in 2 s; wait until every charge is recorded; measure."""
    engine = schedule.engine
    schedule.vacuum()
    stats_before = stack.emulator.stats()
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    with engine.connect() as conn:
        # This run's rows have ids above these: the progress queries are primary-key range scans, however
        # much history the earlier runs left.
        first_invoice = conn.execute(text("SELECT coalesce(max(id), 0) FROM invoices")).scalar_one()
        first_attempt = conn.execute(text("SELECT coalesce(max(id), 0) FROM charge_attempts")).scalar_one()
        first_event = (
            conn.execute(text("SELECT coalesce(max(id), 0) FROM stream_events")).scalar_one() if stack.receiver else 0
        )
        received_before = stack.receiver.distinct() if stack.receiver else 0
    schedule.next_run(due, count)
    mine = f"i.id > {first_invoice} AND a.id > {first_attempt}"
    meter = cpu_meter(stack)
    meter.start()
    deadline = time.monotonic() + timeout_seconds
    done = 0
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with engine.connect() as conn:
            done = conn.execute(
                text(f"SELECT count(*) FROM charge_attempts a WHERE a.id > {first_attempt} AND a.state IN {TERMINAL}")
            ).scalar_one()
        if done >= count:
            break
    delivery: dict[str, Any] = {}
    if stack.receiver is not None:
        # Every event of the run committed with its charge: wait until the receiver has them all, so that the
        # workers' CPU includes delivering them.
        with engine.connect() as conn:
            expected = conn.execute(text(f"SELECT count(*) FROM stream_events WHERE id > {first_event}")).scalar_one()
        received = 0
        while time.monotonic() < deadline:
            received = stack.receiver.distinct() - received_before
            if received >= expected:
                break
            time.sleep(0.2)
        delivery = {"events": expected, "received": received}
    cpu = meter.stop()
    with engine.connect() as conn:
        window = conn.execute(
            text(
                "SELECT min(i.created_at), max(a.finished_at) FROM invoices i JOIN charge_attempts a"
                f" ON a.invoice_id = i.id WHERE {mine}"
            )
        ).one()
        latencies = [
            float(v)
            for v in conn.execute(
                text(
                    "SELECT extract(epoch FROM a.finished_at - i.period_start) FROM charge_attempts a"
                    f" JOIN invoices i ON i.id = a.invoice_id WHERE {mine} AND a.state IN {TERMINAL}"
                )
            ).scalars()
        ]
        states = dict(
            conn.execute(  # type: ignore[arg-type]
                text(
                    "SELECT a.state, count(*) FROM charge_attempts a JOIN invoices i ON i.id = a.invoice_id"
                    f" WHERE {mine} GROUP BY a.state"
                )
            ).all()
        )
        invoices = dict(
            conn.execute(  # type: ignore[arg-type]
                text(f"SELECT i.state, count(*) FROM invoices i WHERE i.id > {first_invoice} GROUP BY i.state")
            ).all()
        )
        doubles = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT invoice_id FROM charge_attempts WHERE state = 'approved'"
                f" AND invoice_id > {first_invoice} GROUP BY invoice_id HAVING count(*) > 1) d"
            )
        ).scalar_one()
    if stack.receiver is not None:
        delivery.update(delivery_figures(stack.receiver, engine, first_event, window[0], window[1]))
    stats_after = stack.emulator.stats()
    approved_at_tpaga = stats_after["charges"]["approved"] - stats_before["charges"]["approved"]
    seconds = (window[1] - window[0]).total_seconds() if window[0] and window[1] else float("nan")
    correct = (
        done >= count
        and invoices == {"paid": count}
        and states == {"approved": count}
        and doubles == 0
        and approved_at_tpaga == count
        and (stack.receiver is None or delivery["received"] >= delivery["events"])
    )
    return {
        "charges": done,
        "seconds": round(seconds, 3),
        "charges_per_second": round(done / seconds, 1) if seconds > 0 else None,
        "latency_p50_seconds": round(percentile(latencies, 0.50), 3),
        "latency_p99_seconds": round(percentile(latencies, 0.99), 3),
        "attempts": states,
        "invoices": invoices,
        "approved_at_emulator": approved_at_tpaga,
        "correct": correct,
        "cpu_seconds": cpu,
        **({"delivery": delivery} if delivery else {}),
    }


def delivery_figures(
    receiver: Receiver, engine: Engine, first_event: int, started: datetime | None, charged: datetime | None
) -> dict[str, Any]:
    """Commit (stream_events.created_at) -> first arrival at the receiver, per event of the run; the rate of
    delivery over the same kind of window as the charges' (first event committed -> last event received)."""
    arrivals = receiver.arrivals()
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT event_id, extract(epoch FROM created_at) FROM stream_events WHERE id > {first_event}")
        ).all()
    lags = [arrivals[event_id] - float(created) for event_id, created in rows if event_id in arrivals]
    if not lags:
        return {"delivered": 0}
    first_commit = min(float(created) for _, created in rows)
    last_arrival = max(arrivals[event_id] for event_id, _ in rows if event_id in arrivals)
    seconds = last_arrival - first_commit
    return {
        "delivered": len(lags),
        "seconds": round(seconds, 3),
        "events_per_second": round(len(lags) / seconds, 1) if seconds > 0 else None,
        "commit_to_delivery_p50_seconds": round(percentile(lags, 0.50), 3),
        "commit_to_delivery_p99_seconds": round(percentile(lags, 0.99), 3),
        "commit_to_delivery_max_seconds": round(max(lags), 3),
        # How long after the last charge was recorded the last event arrived.
        "last_arrival_after_last_charge_seconds": round(last_arrival - charged.timestamp(), 3) if charged else None,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "runs": len(runs),
        "median_charges_per_second": med("charges_per_second"),
        "median_latency_p50_seconds": med("latency_p50_seconds"),
        "median_latency_p99_seconds": med("latency_p99_seconds"),
        "min_charges_per_second": min((r["charges_per_second"] or 0) for r in runs) if runs else None,
        "max_charges_per_second": max((r["charges_per_second"] or 0) for r in runs) if runs else None,
        "all_correct": all(r["correct"] for r in runs),
        **(
            {
                "median_events_per_second": round(
                    statistics.median(r["delivery"].get("events_per_second") or 0 for r in runs), 1
                ),
                "median_commit_to_delivery_p99_seconds": round(
                    statistics.median(r["delivery"].get("commit_to_delivery_p99_seconds") or 0 for r in runs), 3
                ),
                # CPU of the delivery process per event delivered (--delivery-process; 0 without it).
                "delivery_cpu_us_per_event": round(
                    statistics.median(
                        r["cpu_seconds"]["delivery"] / max(1, r["delivery"].get("delivered") or 0) * 1e6 for r in runs
                    )
                ),
                "median_events_per_charge_per_second": round(
                    statistics.median(
                        (r["delivery"].get("events_per_second") or 0) / (r["charges_per_second"] or 1) for r in runs
                    ),
                    2,
                ),
            }
            if runs and all("delivery" in r for r in runs)
            else {}
        ),
        # CPU microseconds per charge by process group (median over runs); "not_benchmark" is other programs
        "cpu_us_per_charge": {
            key: round(statistics.median(r["cpu_seconds"][key] / r["charges"] * 1e6 for r in runs if r["charges"]))
            for key in runs[0]["cpu_seconds"]
            if key != "wall"
        }
        if runs and all(r["charges"] for r in runs)
        else None,
    }


def e2e_section(
    args: argparse.Namespace,
    db_url: str,
    schedule: Schedule,
    broker: str,
    emulator: Emulator,
    logs: Path,
    results: dict[str, Any],
    receiver: Receiver | None = None,
) -> None:
    scenarios: list[dict[str, Any]] = []
    results["end_to_end"] = scenarios
    memory: dict[str, Any] = {}
    for workers in args.workers:
        # BILLING_ variables of this shell never reach the workers (process_env drops them): pass it explicitly.
        threads = {"BILLING_DELIVERY_THREADS": str(args.delivery_threads)} if args.delivery_threads else {}
        stack = Stack(
            db_url, broker, emulator, logs, receiver=receiver, extra_env=threads, delivery_process=args.delivery_process
        )
        log(f"end to end: starting {workers} worker process(es) and beat")
        stack.start(workers, f"w{workers}")
        pid = stack.worker_pids()[0]
        if workers == 1:
            memory = {"pid_rss_mb_at_ready": round(rss_mb(pid), 1), "samples": []}
        try:
            emulator.set_latency(0)
            warm = e2e_run(stack, schedule, args.subscriptions, max(180.0, args.subscriptions / 20))
            log(f"  warm-up: {warm['charges']} charges, {warm['charges_per_second']}/s")
            charged = warm["charges"]
            if workers == 1:
                memory["rss_mb_after_warmup"] = round(rss_mb(pid), 1)
                memory["charges_in_warmup"] = charged
            for latency in args.latencies:
                emulator.set_latency(latency)
                runs = []
                for n in range(args.runs):
                    run = e2e_run(stack, schedule, args.subscriptions, max(180.0, args.subscriptions / 20))
                    runs.append(run)
                    charged += run["charges"]
                    log(
                        f"  {workers} worker(s), {latency} ms, run {n + 1}: {run['charges']} charges in "
                        f"{run['seconds']} s = {run['charges_per_second']}/s, p50 {run['latency_p50_seconds']} s, "
                        f"p99 {run['latency_p99_seconds']} s, correct={run['correct']}"
                        + (
                            f"; events {run['delivery'].get('delivered')}/{run['delivery']['events']} delivered at"
                            f" {run['delivery'].get('events_per_second')}/s, commit->delivery p50"
                            f" {run['delivery'].get('commit_to_delivery_p50_seconds')} s, p99"
                            f" {run['delivery'].get('commit_to_delivery_p99_seconds')} s"
                            if "delivery" in run
                            else ""
                        )
                    )
                    if workers == 1:
                        memory["samples"].append({"charges": charged, "rss_mb": round(rss_mb(pid), 1)})
                scenarios.append({"workers": workers, "latency_ms": latency, **summarize(runs), "detail": runs})
            if "profile" in args.only and workers == max(args.workers):
                results["profile"] = profile_run(args, stack, schedule, pid)
        finally:
            stack.stop()
        if workers == 1:
            memory["charges_total"] = charged
            end = memory["samples"][-1]["rss_mb"] if memory["samples"] else None
            if end:
                memory["growth_from_warmup_percent"] = round(100 * (end / memory["rss_mb_after_warmup"] - 1), 1)
                memory["growth_from_ready_percent"] = round(100 * (end / memory["pid_rss_mb_at_ready"] - 1), 1)
            # The yardstick: 100,000 charges, counted from ready and counted from the end of the warm-up.
            for key, base, since in (
                ("from_ready", memory["pid_rss_mb_at_ready"], 0),
                ("from_warmup", memory.get("rss_mb_after_warmup"), memory.get("charges_in_warmup", 0)),
            ):
                sample = next((x for x in memory["samples"] if x["charges"] - since >= 100_000), None)
                if sample and base:
                    memory[f"after_100k_{key}"] = {
                        **sample,
                        "growth_percent": round(100 * (sample["rss_mb"] / base - 1), 1),
                    }
            results["memory"] = memory


# Where a worker's time goes: each sampled stack (py-spy --gil: only the thread holding the GIL, i.e. Python
# doing work) counts for the first category whose function it contains.
PROFILE_CATEGORIES = (
    ("HTTP call to the gateway (the charge coroutines: aiohttp request, answer, mapping)", ("call_gateway",)),
    ("event loop (aiohttp reading and parsing answers, asyncio scheduling)", ("_run_once",)),
    ("open invoices (beat's task)", ("open_due_invoices",)),
    ("claim (transaction 1)", ("claim_invoices",)),
    ("mark sending (transaction 2)", ("mark_sending",)),
    ("record outcomes (transaction 3)", ("record_outcomes",)),
    ("outbox publish and relay", ("publish_outbox", "relay_outbox")),
    ("other periodic tasks", ("reconcile", "enqueue_due_invoices", "run_refunds")),
    ("Celery: task protocol, events, acks", ("trace_task", "asynloop", "Consumer", "on_task_received")),
    ("thread pools (handing out work)", ("_worker", "GatewayPool")),
)


def profile_run(args: argparse.Namespace, stack: Stack, schedule: Schedule, pid: int) -> dict[str, Any]:
    """One extra run (not in the medians) at 50 ms with py-spy sampling worker `pid`."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        log("profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped")
        return {"skipped": "py-spy not installed"}
    latency = 50 if 50 in args.latencies else args.latencies[0]
    stack.emulator.set_latency(latency)
    raw = Path(args.out) / f"{args.stamp}-profile.txt"
    started = time.monotonic()
    # Sampling for the whole run (opening, claiming, calling, recording), stopped like Ctrl-C stops it.
    sampler = subprocess.Popen(
        [str(spy), "record", "-p", str(pid), "--gil", "--nonblocking", "-r", "200", "-f", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = e2e_run(stack, schedule, args.subscriptions, max(180.0, args.subscriptions / 20))
    sampler.send_signal(signal.SIGINT)
    sampler.wait(60)
    seconds = round(time.monotonic() - started, 1)
    totals: dict[str, int] = {name: 0 for name, _ in PROFILE_CATEGORIES}
    totals["other"] = 0
    samples = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples += int(count)
        frames = [f.split(" (")[0] for f in stack_text.split(";")]
        name = next(
            (name for name, needles in PROFILE_CATEGORIES if any(n in f for f in frames for n in needles)),
            "other",
        )
        totals[name] += int(count)
    shares = {k: round(100 * v / samples, 1) for k, v in totals.items()} if samples else {}
    log(f"profile of worker {pid} at {latency} ms ({samples} samples): {shares}")
    return {
        "latency_ms": latency,
        "charges_per_second": run["charges_per_second"],
        "seconds_sampled": seconds,
        "samples": samples,
        "share_of_gil_time_percent": shares,
        "worker_cpu_us_per_charge": round(run["cpu_seconds"]["workers"] / max(1, run["charges"]) * 1e6),
        "raw_stacks": str(raw),
    }


def single_path_section(
    args: argparse.Namespace,
    db_url: str,
    schedule: Schedule,
    broker: str,
    emulator: Emulator,
    logs: Path,
    results: dict[str, Any],
) -> None:
    latency = 50 if 50 in args.latencies else args.latencies[0]
    count = min(args.subscriptions, args.single_charges)
    stack = Stack(db_url, broker, emulator, logs, extra_env={"BILLING_CHARGE_BATCH_SIZE": "1"})
    log(f"single path: BILLING_CHARGE_BATCH_SIZE=1, 2 workers, {latency} ms, {count} charges")
    stack.start(2, "single")
    try:
        emulator.set_latency(latency)
        run = e2e_run(stack, schedule, count, max(300.0, count / 5))
    finally:
        stack.stop()
    log(f"  {run['charges']} charges in {run['seconds']} s = {run['charges_per_second']}/s, correct={run['correct']}")
    results["single_path"] = {"workers": 2, "latency_ms": latency, **run}


def ratelimit_section(
    args: argparse.Namespace,
    db_url: str,
    schedule: Schedule,
    broker: str,
    emulator: Emulator,
    logs: Path,
    results: dict[str, Any],
) -> None:
    limit = args.rate_limit
    count = min(args.subscriptions, limit * 10)
    stack = Stack(db_url, broker, emulator, logs, extra_env={"TPAGA_RATE_LIMIT": str(limit)})
    log(f"rate limit: TPAGA_RATE_LIMIT={limit}, 2 workers, 0 ms, {count} charges")
    stack.start(2, "ratelimit")
    try:
        emulator.set_latency(0)
        started = datetime.now(UTC)
        run = e2e_run(stack, schedule, count, max(300.0, 3 * count / limit))
    finally:
        stack.stop()
    times = sorted(t for t in emulator.ledger_times() if t >= started)
    sustained = rate_of(times)
    # After the first second: the schedule the limiter hands out starts at the first reservation, but the first
    # requests reach the emulator late (the workers are still claiming and opening connections) and then
    # arrive bunched with those on time, which the whole span counts as a higher rate.
    steady = rate_of([t for t in times if times and t >= times[0] + timedelta(seconds=1)])
    busiest_1s, busiest_5s = busiest(times, 1.0), busiest(times, 5.0)
    # The limiter hands out send times one interval apart (shared by both workers through Redis). Between that
    # moment and the emulator stamping the request, a busy worker's thread waits for the GIL and the emulator's
    # event loop for the CPU, so requests can arrive bunched: short windows show more than the limit even when
    # the sustained rate is under it. Leave Tpaga's own limit some headroom (PERFORMANCE.md).
    held = steady <= limit * 1.01
    log(
        f"  sustained {sustained:.0f}/s at the emulator over the whole run, {steady:.1f}/s after its first second, "
        f"for a limit of {limit}/s (held: {held}); end to end {run['charges_per_second']}/s; busiest second "
        f"{busiest_1s}, busiest five seconds {busiest_5s}"
    )
    results["rate_limit"] = {
        "limit_per_second": limit,
        "burst": default_burst(limit),
        "workers": 2,
        "sustained_per_second_at_emulator": round(sustained, 1),
        "steady_per_second_after_first_second": round(steady, 1),
        "busiest_one_second_window": busiest_1s,
        "busiest_five_second_window": busiest_5s,
        "held": held,
        **run,
    }


def rate_of(times: list[datetime]) -> float:
    """Arrivals per second between the first and the last of the (sorted) times."""
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    return (len(times) - 1) / span if span > 0 else float("nan")


def busiest(times: list[datetime], seconds: float) -> int:
    """The most of the (sorted) times that fall in any window of that many seconds."""
    most, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - timedelta(seconds=seconds):
            j += 1
        most = max(most, i - j + 1)
    return most


# --- Celery's ceiling and the naive loop --------------------------------------------------------------------


class NoopWorker(CeleryProcess):
    """`celery -A benchmarks.noop_app ...` (CeleryProcess runs `-A tasks`)."""

    def start(self) -> NoopWorker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.noop_app", *self.args],
            env=self.env,
            cwd=str(ROOT),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self


def noop_section(args: argparse.Namespace, broker: str, logs: Path, results: dict[str, Any]) -> None:
    import redis

    env = process_env({"CELERY_BROKER_URL": broker})
    os.environ["CELERY_BROKER_URL"] = broker
    sys.modules.pop("benchmarks.noop_app", None)
    from benchmarks import noop_app

    client = redis.Redis.from_url(broker)
    out: dict[str, Any] = {"messages": args.noop_messages, "by_workers": {}}
    for workers in (1, 2):
        client.delete(noop_app.QUEUE, "unacked", "unacked_index")
        started = time.monotonic()
        with noop_app.app.producer_or_acquire() as producer:
            for _ in range(args.noop_messages):
                noop_app.app.send_task(noop_app.TASK, queue=noop_app.QUEUE, producer=producer)
        publish_seconds = time.monotonic() - started
        procs = [
            NoopWorker(
                [
                    "worker",
                    "-Q",
                    noop_app.QUEUE,
                    "-n",
                    f"noop{n}@%h",
                    "--loglevel",
                    "WARNING",
                    "--without-mingle",
                    "--without-gossip",
                ],
                env,
                logs / f"noop-{workers}-{n}.log",
            ).start()
            for n in range(workers)
        ]
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + 300
        total = args.noop_messages
        try:
            while time.monotonic() < deadline:
                remaining = int(client.llen(noop_app.QUEUE)) + int(client.hlen("unacked"))
                samples.append((time.monotonic(), total - remaining))
                if remaining == 0:
                    break
                time.sleep(0.02)
        finally:
            for proc in procs:
                proc.stop(30)
        lo = next(s for s in samples if s[1] >= total * 0.1)
        hi = next(s for s in samples if s[1] >= total * 0.9)
        rate = (hi[1] - lo[1]) / (hi[0] - lo[0])
        log(
            f"no-op ceiling, {workers} worker process(es): {rate:.0f} tasks/s"
            f" (publishing {total}: {publish_seconds:.1f} s)"
        )
        out["by_workers"][str(workers)] = {
            "tasks_per_second": round(rate, 1),
            "publish_seconds": round(publish_seconds, 2),
        }
    client.close()
    results["celery_noop"] = out


def naive_section(args: argparse.Namespace, emulator: Emulator, results: dict[str, Any]) -> None:
    """The 2016 blog's client, verbatim in spirit: a fresh `requests.post` per charge, one after another."""
    from billing.gateway import TpagaClient

    client = TpagaClient(emulator.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    emulator.set_latency(0)
    customer = client.create_customer(email="naive@example.com")
    token = client.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2035, holder_name="Naive")
    card = client.associate_card(customer.id, token).id
    client.close()

    def api_post(path: str, data: dict[str, Any]) -> requests.Response:
        # (the blog passes no timeout; neither does this loop, to measure the blog's code)
        return requests.post(urljoin(emulator.api_url, path), json=data, auth=(DEFAULT_PRIVATE_KEY, ""))  # noqa: S113

    out = {}
    for latency in args.latencies:
        emulator.set_latency(latency)
        count, started = 0, time.monotonic()
        while time.monotonic() - started < args.naive_seconds:
            response = api_post(
                "charge/credit_card",
                {
                    "orderId": f"BRG-{count}",
                    "currency": "COP",
                    "taxAmount": 0,
                    "description": "One bridge in good condition.",
                    "installments": 1,
                    "amount": 4500,
                    "creditCard": card,
                },
            )
            if response.status_code != 201:
                raise RuntimeError(f"naive charge answered {response.status_code}")
            count += 1
        rate = count / (time.monotonic() - started)
        log(f"naive sequential loop at {latency} ms: {rate:.1f} charges/s")
        out[str(latency)] = {"charges": count, "charges_per_second": round(rate, 2)}
    results["naive_loop"] = out


# --- finding due work among a million -----------------------------------------------------------------------


SCAN_DUE = 10_000
SCAN_TOTAL = 1_000_000


def scan_section(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    from billing.db import migrate

    out: dict[str, Any] = {"subscriptions": SCAN_TOTAL, "due": SCAN_DUE}
    name = "billing_bench_scan"
    pg = recreate_database(name)
    try:
        migrate.upgrade(pg)
        out["postgresql"] = scan_one(pg, "postgresql")
    finally:
        drop_database(name)
    lite = f"sqlite:///{tmp}/scan.db"
    migrate.upgrade(lite)
    out["sqlite"] = scan_one(lite, "sqlite")
    results["finding_due_work"] = out


def scan_one(url: str, dialect: str) -> dict[str, Any]:
    from sqlalchemy.dialects import postgresql as pg_dialect
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from billing.bootstrap import build_context
    from billing.clock import TestClock
    from billing.config import Settings
    from billing.db.engine import make_engine
    from billing.domain.money import Money
    from billing.services import catalog
    from billing.services.invoicing import due_subscription_rows, open_due_invoices

    now = datetime.now(UTC).replace(microsecond=0)
    engine = make_engine(url)
    ctx = build_context(
        Settings(database_url=url, tpaga_private_key=DEFAULT_PRIVATE_KEY),
        engine=engine,
        gateway=object(),  # type: ignore[arg-type]
        clock=TestClock(now),
    )
    plan = catalog.create_plan(ctx, code="scan", name="Scan", amount=Money.from_major("45000", "COP"))
    customer = 1
    started = time.monotonic()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, tpaga_customer_id, email, created_at)"
                " VALUES (1, 'cus-scan', 's@e.co', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO cards (customer_id, tpaga_card_id, status, created_at)"
                " VALUES (1, 'card-scan', 'usable', :now)"
            ),
            {"now": now},
        )
        # The first SCAN_DUE are due (minutes to hours ago), the rest renew over the next 30 days.
        if dialect == "postgresql":
            generator = (
                "SELECT g, CASE WHEN g <= :due THEN CAST(:now AS timestamptz) - g * interval '1 second'"
                " ELSE CAST(:now AS timestamptz) + (g % 2592000 + 60) * interval '1 second' END"
                " FROM generate_series(1, :total) g"
            )
            conn.execute(
                text(
                    "INSERT INTO subscriptions (customer_id, plan_id, card_id, status, anchor_at, next_period_index,"
                    " next_billing_at, created_at, updated_at)"
                    f" SELECT :c, :p, 1, 'active', t.at, 0, t.at, :now, :now FROM ({generator}) AS t(g, at)"
                ),
                {"c": customer, "p": plan, "now": now, "due": SCAN_DUE, "total": SCAN_TOTAL},
            )
        else:
            conn.execute(
                text(
                    "INSERT INTO subscriptions (customer_id, plan_id, card_id, status, anchor_at, next_period_index,"
                    " next_billing_at, created_at, updated_at)"
                    " WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :total)"
                    " SELECT :c, :p, 1, 'active', at, 0, at, :now, :now FROM (SELECT g, CASE WHEN g <= :due"
                    " THEN datetime(:now, '-' || g || ' seconds') ELSE datetime(:now, '+' || (g % 2592000 + 60)"
                    " || ' seconds') END AS at FROM s)"
                ),
                {
                    "c": customer,
                    "p": plan,
                    "now": now.replace(tzinfo=None).isoformat(" "),
                    "due": SCAN_DUE,
                    "total": SCAN_TOTAL,
                },
            )
    generate_seconds = time.monotonic() - started
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    scan = due_subscription_rows(now, 500)
    compiled = scan.compile(
        dialect=pg_dialect.dialect() if dialect == "postgresql" else sqlite_dialect.dialect(),
        compile_kwargs={"literal_binds": True},
    )
    sql = str(compiled)
    explain_prefix = "EXPLAIN (ANALYZE, BUFFERS) " if dialect == "postgresql" else "EXPLAIN QUERY PLAN "
    with engine.begin() as conn:
        plan_rows = conn.exec_driver_sql(explain_prefix + sql).all()
    explain = [" | ".join(str(c) for c in row) if dialect == "sqlite" else row[0] for row in plan_rows]
    uses_index = any("ix_subscriptions_due" in line for line in explain)
    # Claiming: lock (FOR UPDATE SKIP LOCKED) every due subscription, the scan beat's opener runs, in one go.
    claim = due_subscription_rows(now, SCAN_DUE)
    started = time.monotonic()
    with ctx.sessions() as session, session.begin():
        claimed = len(session.execute(claim).all())
    claim_seconds = time.monotonic() - started
    # Opening: what beat does with them, passes of 500 until none is due.
    started = time.monotonic()
    opened = passes = 0
    while True:
        count = open_due_invoices(ctx, limit=500)
        opened += count
        passes += 1
        if not count:
            break
    open_seconds = time.monotonic() - started
    log(
        f"finding due work ({dialect}): generated {SCAN_TOTAL} in {generate_seconds:.1f} s; claimed {claimed} due in "
        f"{claim_seconds * 1000:.0f} ms (index used: {uses_index}); opened {opened} invoices in {open_seconds:.2f} s"
    )
    return {
        "generate_seconds": round(generate_seconds, 2),
        "claim_seconds": round(claim_seconds, 3),
        "claimed": claimed,
        "open_invoices_seconds": round(open_seconds, 3),
        "opened": opened,
        "open_passes": passes,
        "scan_uses_ix_subscriptions_due": uses_index,
        "explain": explain,
    }


# --- main ---------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscriptions", type=int, default=20_000, help="charges per end-to-end run")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (the median is reported)")
    parser.add_argument("--latencies", default="0,50,300", help="emulator latencies in ms")
    parser.add_argument("--workers", default="1,2", help="worker process counts")
    parser.add_argument("--subs-per-card", type=int, default=10, help="subscriptions sharing one emulator card")
    parser.add_argument("--rate-limit", type=int, default=500, help="TPAGA_RATE_LIMIT for the rate-limit section")
    parser.add_argument("--noop-messages", type=int, default=10_000)
    parser.add_argument("--single-charges", type=int, default=2_000, help="charges in the one-task-per-charge run")
    parser.add_argument("--naive-seconds", type=float, default=5.0)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument("--full", action="store_true", help="100,000 charges per end-to-end run")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument(
        "--database",
        default="billing_bench",
        help="the PostgreSQL database to (re)create: another name when other benchmarks share the server",
    )
    parser.add_argument(
        "--metric-triggers",
        choices=("on", "off"),
        default="on",
        help="off disables the metric triggers of migration 0009 (ALTER TABLE ... DISABLE TRIGGER USER): the A/B"
        " of their cost on the charge path",
    )
    parser.add_argument(
        "--webhook-latency-ms",
        type=int,
        default=None,
        help="end to end with a webhook receiver on loopback answering after this many ms, registered for every"
        " event: adds events delivered/s and the commit -> delivery latency (p50, p99) per run",
    )
    parser.add_argument(
        "--delivery-process",
        action="store_true",
        help="end to end: the charging workers consume every queue but billing.events and a third worker only"
        " billing.events (the delivery loop); its CPU is reported apart ('delivery', and per event delivered)",
    )
    parser.add_argument(
        "--delivery-threads",
        type=int,
        default=None,
        help="BILLING_DELIVERY_THREADS for the workers (webhooks in flight per delivery pass; the app's default"
        " when not given)",
    )
    args = parser.parse_args()
    if args.delivery_threads is not None and args.delivery_threads < 1:
        parser.error("--delivery-threads must be at least 1")
    if args.delivery_process and args.webhook_latency_ms is None:
        parser.error("--delivery-process needs --webhook-latency-ms (without a receiver there is nothing to deliver)")
    if args.full:
        args.subscriptions = max(args.subscriptions, 100_000)
    args.latencies = [int(v) for v in args.latencies.split(",") if v.strip()]
    args.workers = [int(v) for v in args.workers.split(",") if v.strip()]
    args.only = {v.strip() for v in args.only.split(",") if v.strip()}
    unknown = args.only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def disable_metric_triggers(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for table in ("invoices", "charge_attempts", "refunds", "subscriptions", "deliveries"):
            conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
    engine.dispose()
    log("metric triggers disabled")


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    noop = results.get("celery_noop", {}).get("by_workers", {})
    naive = results.get("naive_loop", {})
    for scenario in results.get("end_to_end", []):
        key = f"{scenario['workers']}w_{scenario['latency_ms']}ms"
        rate = scenario["median_charges_per_second"]
        if not rate:
            continue
        entry: dict[str, Any] = {"charges_per_second": rate}
        if str(scenario["workers"]) in noop:
            entry["vs_celery_noop_ceiling"] = round(rate / noop[str(scenario["workers"])]["tasks_per_second"], 2)
        if str(scenario["latency_ms"]) in naive:
            entry["vs_naive_loop"] = round(rate / naive[str(scenario["latency_ms"])]["charges_per_second"], 1)
        single = results.get("single_path")
        if single and single["latency_ms"] == scenario["latency_ms"] and scenario["workers"] == 2:
            entry["vs_single_path"] = round(rate / single["charges_per_second"], 1)
        out[key] = entry
    return out


def print_summary(results: dict[str, Any]) -> None:
    print("\n=== summary ===")
    print(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores,"
        f" Python {results['machine']['python']}"
    )
    for s in results.get("end_to_end", []):
        print(
            f"end to end, {s['workers']} worker(s), {s['latency_ms']:>3} ms: median {s['median_charges_per_second']}/s"
            f" (min {s['min_charges_per_second']}, max {s['max_charges_per_second']}),"
            f" p50 {s['median_latency_p50_seconds']} s,"
            f" p99 {s['median_latency_p99_seconds']} s, all correct: {s['all_correct']}"
            + (
                f"; events delivered median {s['median_events_per_second']}/s"
                f" ({s['median_events_per_charge_per_second']} x charges/s),"
                f" commit->delivery p99 {s['median_commit_to_delivery_p99_seconds']} s,"
                f" delivery process {s['delivery_cpu_us_per_event']} µs/event"
                if "median_events_per_second" in s
                else ""
            )
        )
    if "single_path" in results:
        s = results["single_path"]
        print(f"single path (one task per charge), 2 workers, {s['latency_ms']} ms: {s['charges_per_second']}/s")
    if "rate_limit" in results:
        r = results["rate_limit"]
        print(
            f"rate limit {r['limit_per_second']}/s: sustained {r['sustained_per_second_at_emulator']}/s at the"
            f" emulator, {r['steady_per_second_after_first_second']}/s after the first second (held: {r['held']}),"
            f" busiest second {r['busiest_one_second_window']}, busiest five seconds"
            f" {r['busiest_five_second_window']}"
        )
    for workers, n in results.get("celery_noop", {}).get("by_workers", {}).items():
        print(f"celery no-op ceiling, {workers} worker(s): {n['tasks_per_second']} tasks/s")
    for latency, n in results.get("naive_loop", {}).items():
        print(f"naive sequential loop, {latency} ms: {n['charges_per_second']} charges/s")
    for dialect, f in results.get("finding_due_work", {}).items():
        if isinstance(f, dict):
            print(
                f"finding due work ({dialect}): claim {SCAN_DUE} of {SCAN_TOTAL} in {f['claim_seconds']} s,"
                f" open their invoices in {f['open_invoices_seconds']} s,"
                f" index used: {f['scan_uses_ix_subscriptions_due']}"
            )
    if "memory" in results:
        m = results["memory"]
        last = m["samples"][-1] if m.get("samples") else {}
        print(
            f"worker RSS: {m.get('pid_rss_mb_at_ready')} MB at ready, {m.get('rss_mb_after_warmup')} MB after warm-up"
            f" ({m.get('charges_in_warmup')} charges), {last.get('rss_mb')} MB after {last.get('charges')} charges:"
            f" {m.get('growth_from_warmup_percent')} % since warm-up,"
            f" {m.get('growth_from_ready_percent')} % since ready"
        )
        for key in ("from_ready", "from_warmup"):
            if f"after_100k_{key}" in m:
                x = m[f"after_100k_{key}"]
                print(
                    f"worker RSS 100,000 charges {key.replace('_', ' ')}: {x['rss_mb']} MB after {x['charges']}"
                    f" charges, {x['growth_percent']:+} %"
                )
    for key, r in results.get("ratios", {}).items():
        print(f"ratio {key}: {r}")


@contextlib.contextmanager
def broker_db() -> Iterator[str]:
    with private_redis_db(REDIS) as url:
        yield url


def main() -> int:
    args = parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.stamp = stamp
    results: dict[str, Any] = {
        "started_at": stamp,
        "machine": machine_info(),
        "config": {
            k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items() if k not in ("out", "stamp")
        },
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp_name, broker_db() as broker:
        tmp = Path(tmp_name)
        logs = tmp / "logs"
        logs.mkdir()
        emulator = Emulator()
        receiver = Receiver(args.webhook_latency_ms) if args.webhook_latency_ms is not None else None
        try:
            if args.only & {"e2e", "single", "ratelimit", "memory"}:
                cards = -(-args.subscriptions // args.subs_per_card)
                log(f"seeding {cards} customers with cards at the emulator and {args.subscriptions} subscriptions")
                db_url = recreate_database(args.database)
                from billing.db import migrate

                migrate.upgrade(db_url)
                if args.metric_triggers == "off":
                    disable_metric_triggers(db_url)
                seed_database(db_url, seed_cards(emulator.api_url, cards), args.subscriptions)
                if receiver is not None:
                    receiver.register(db_url)
                schedule = Schedule(create_engine(db_url, pool_size=2))
                if args.only & {"e2e", "memory"}:
                    e2e_section(args, db_url, schedule, broker, emulator, logs, results, receiver)
                if "single" in args.only:
                    single_path_section(args, db_url, schedule, broker, emulator, logs, results)
                if "ratelimit" in args.only:
                    ratelimit_section(args, db_url, schedule, broker, emulator, logs, results)
                drop_database(args.database)
            if "noop" in args.only:
                noop_section(args, broker, logs, results)
            if "naive" in args.only:
                naive_section(args, emulator, results)
            if "scan" in args.only:
                scan_section(args, tmp, results)
        finally:
            emulator.stop()
            if receiver is not None:
                receiver.stop()
            results["ratios"] = ratios(results)
            results["seconds"] = round(time.monotonic() - begun, 1)
            results["loadavg_at_end"] = os.getloadavg()
            path = out_dir / f"{stamp}.json"
            path.write_text(json.dumps(results, indent=2, default=str))
            print_summary(results)
            print(f"\nwritten to {path} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
