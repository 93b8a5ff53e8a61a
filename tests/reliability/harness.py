"""The reliability suite's world: a fresh PostgreSQL schema, a dedicated redis-server, a private Tpaga emulator
over HTTP, real `celery -A tasks worker|beat|flower` subprocesses, and helpers to seed, kill, wait and read
the workers' logs. Every figure a scenario reports is collected in FIGURES and written to
`bench-results/reliability.json` at the end of the session (see conftest.py).

Sizes scale with RELIABILITY_SCALE (1 = the CI size that runs in the normal suite).
"""

from __future__ import annotations

import ast
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from sqlalchemy import func, select, text

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db import migrate
from billing.db.models import Card, ChargeAttempt, Customer, Invoice, Plan, Subscription
from billing.domain.money import Money
from billing.domain.periods import due_period_indexes
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from billing.services import catalog
from billing.services.context import Context
from tasks.testing import CeleryProcess, process_env, worker
from tests.procs import RedisServer

SCALE = float(os.environ.get("RELIABILITY_SCALE") or 1)
TZ = "America/Bogota"

APPROVES = ("4111111111111111", "4242424242424242", "5500000000000004", "378282246310005")
SOFT_51 = "4000000000510000"
HARD_04 = "4000000000040008"
UNKNOWN_9999 = "4000000099990006"

# Figures of every scenario run in this session, by scenario name (written out by conftest.py).
FIGURES: dict[str, dict[str, Any]] = {}
# Texts to scan for secrets at the end (scenario 7): (label, path or text), and the secrets seen so far.
ARTIFACTS: list[tuple[str, Path | str]] = []
SECRETS: set[str] = set()


def scaled(n: float, minimum: int = 1) -> int:
    return max(minimum, round(n * SCALE))


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(v)}" for k, v in params.items())


@dataclass
class Seeded:
    subscription_ids: list[int]
    card_numbers: dict[int, str]  # subscription id -> test card number


@dataclass
class World:
    """One scenario's universe. Build with `World.create(...)`; `close()` stops every process it started."""

    name: str
    tmp: Path
    pg_url: str
    sandbox: Any
    redis: RedisServer
    ctx: Context
    gateway: TpagaClient
    tag: str
    procs: list[CeleryProcess] = field(default_factory=list)
    incarnations: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    killed_while_sending: set[int] = field(default_factory=set)  # attempts `sending` right after a SIGKILL
    env_defaults: dict[str, str] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    started_at: float = field(default_factory=time.monotonic)
    closed: bool = False

    @classmethod
    def create(cls, name: str, tmp: Path, pg_url: str, sandbox: Any) -> World:
        tag = f"rel{uuid.uuid4().hex[:8]}"
        migrate.upgrade(pg_url)
        redis = RedisServer(tmp / "redis").start()
        gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, read_timeout_seconds=30)
        test_url = with_query(pg_url, application_name=f"{tag}-test")
        ctx = build_context(
            Settings(database_url=test_url, tpaga_api_url=sandbox.api_url, tpaga_private_key=DEFAULT_PRIVATE_KEY),
            gateway=gateway,
        )
        (tmp / "logs").mkdir(exist_ok=True)
        world = cls(name, tmp, pg_url, sandbox, redis, ctx, gateway, tag)
        SECRETS.add(DEFAULT_PRIVATE_KEY)
        return world

    # --- processes -------------------------------------------------------------------------------------

    @property
    def worker_db_url(self) -> str:
        """The workers' database URL: tagged so this test can terminate only its workers' connections."""
        return with_query(self.pg_url, application_name=f"{self.tag}-worker")

    def env(self, **overrides: str) -> dict[str, str]:
        base = {
            "DATABASE_URL": self.worker_db_url,
            "CELERY_BROKER_URL": self.redis.url,
            "TPAGA_API_URL": self.sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            "BILLING_WORKER_CONCURRENCY": "4",
            # An attempt still `sending` after 6 s belongs to a dead worker: a live one gives up on Tpaga
            # after the 2 s read timeout (the shortest lease these timeouts allow: billing.config).
            "BILLING_SENDING_LEASE_SECONDS": "6",
            "TPAGA_READ_TIMEOUT": "2",
            "TPAGA_CONNECT_TIMEOUT": "1",
            "BILLING_BEAT_OPEN_SECONDS": "1",
            "BILLING_BEAT_SWEEP_SECONDS": "2",
            "BILLING_BEAT_REFUNDS_SECONDS": "2",
            "BILLING_BEAT_RECONCILE_SECONDS": "2",
            "BILLING_BEAT_OUTBOX_SECONDS": "1",
            "BILLING_SWEEP_GRACE_SECONDS": "3",
            "BILLING_OUTBOX_MIN_AGE_SECONDS": "1",
        }
        return process_env(base | self.env_defaults | overrides)

    def _log_path(self, name: str) -> Path:
        self.incarnations[name] += 1
        path = self.tmp / "logs" / f"{name}.{self.incarnations[name]}.log"
        ARTIFACTS.append((f"{self.name}: {path.name}", path))
        return path

    def start_worker(self, name: str = "w1", concurrency: int = 4, *extra: str, **env: str) -> CeleryProcess:
        env.setdefault("BILLING_WORKER_CONCURRENCY", str(concurrency))
        proc = worker(
            self.env(**env), self._log_path(name), "--concurrency", str(concurrency), *extra, name=f"{name}@rel"
        )
        proc.start()
        self.procs.append(proc)
        return proc

    def start_beat(self, name: str = "beat", **env: str) -> CeleryProcess:
        proc = CeleryProcess(
            ["beat", "--loglevel", "INFO", "-s", str(self.tmp / f"{name}-schedule")],
            self.env(**env),
            self._log_path(name),
        )
        proc.start()
        self.procs.append(proc)
        return proc

    def start_process(self, name: str, args: list[str], **env: str) -> CeleryProcess:
        proc = CeleryProcess(args, self.env(**env), self._log_path(name))
        proc.start()
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the installed `billing` command as an operator would, with the workers' environment; its output
        goes to a log of its own too, so the secret scan at the end sees what the operator saw."""
        command = Path(sys.executable).with_name("billing")
        assert command.exists(), f"{command} is missing: install the project (pip install -e .)"
        done = subprocess.run(
            [str(command), *args],
            env=self.env(**env),
            cwd=self.tmp,  # never a checkout's .env
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        with self._log_path("cli").open("w") as log:
            log.write(f"$ billing {' '.join(args)}\n{done.stdout}{done.stderr}exit {done.returncode}\n")
        return done

    def kill(self, proc: CeleryProcess) -> set[int]:
        """SIGKILL the process group (no warm shutdown, nothing acknowledged); returns the attempts that were
        `sending` right after (a superset of what the dead worker left in flight)."""
        assert proc.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        proc.stop()
        self.kills += 1
        sending = self.attempt_ids("sending")
        self.killed_while_sending |= sending
        return sending

    def close(self) -> None:
        """Stop every process this world started; idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self.procs:
            proc.stop(timeout_seconds=5)
        self.gateway.close()
        self.ctx.sessions.kw["bind"].dispose()
        self.redis.stop()

    def logs(self) -> str:
        texts = []
        for path in sorted((self.tmp / "logs").glob("*.log")):
            texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    # --- the emulator ----------------------------------------------------------------------------------

    def faults(self, **plan: Any) -> dict[str, Any]:
        response = requests.post(self.sandbox.base_url + "__sandbox/faults", json=plan, timeout=10)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def ledger(self) -> dict[str, Any]:
        response = requests.get(self.sandbox.base_url + "__sandbox/ledger", timeout=30)
        response.raise_for_status()
        return dict(response.json())

    def ledger_of(self, order_prefix: str) -> list[dict[str, Any]]:
        """The ledger's charges whose orderId starts with `order_prefix` ("inv12-a" for every try of invoice 12)."""
        return [c for c in self.ledger()["charges"] if str(c.get("orderId") or "").startswith(order_prefix)]

    def stats(self) -> dict[str, Any]:
        response = requests.get(self.sandbox.base_url + "__sandbox/stats", timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def keys(self, private_key: str) -> None:
        response = requests.post(self.sandbox.base_url + "__sandbox/keys", json={"privateKey": private_key}, timeout=10)
        assert response.status_code == 200, response.text

    # --- data ------------------------------------------------------------------------------------------

    def seed(
        self,
        approve: int,
        *,
        soft: int = 0,
        hard: int = 0,
        unknown: int = 0,
        backdated_share: float = 0.2,
        plan_code: str | None = None,
    ) -> Seeded:
        """Customers with cards at the emulator and due subscriptions; a share of them anchored one or two
        months back, so that two or three periods are due at once (catch-up after downtime)."""
        numbers = [self.rng.choice(APPROVES) for _ in range(approve)]
        numbers += [SOFT_51] * soft + [HARD_04] * hard + [UNKNOWN_9999] * unknown
        self.rng.shuffle(numbers)
        plan_id = catalog.create_plan(
            self.ctx,
            code=plan_code or f"{self.tag}-{uuid.uuid4().hex[:6]}",
            name="Monthly",
            amount=Money.from_major("45000", "COP"),
        )
        with ThreadPoolExecutor(32) as pool:
            remote = list(pool.map(self._remote_card, numbers))
        now = self.ctx.clock.now()
        subs: list[Subscription] = []
        with self.ctx.sessions() as session, session.begin():
            for customer_tpaga_id, card, token in remote:
                SECRETS.update({card.id, token})
                customer = Customer(tpaga_customer_id=customer_tpaga_id, email="r@example.com", created_at=now)
                session.add(customer)
                session.flush()
                row = Card(
                    customer_id=customer.id,
                    tpaga_card_id=card.id,
                    brand=card.brand,
                    last_four=card.last_four,
                    exp_month=card.expiration_month,
                    exp_year=card.expiration_year,
                    status="usable",
                    created_at=now,
                )
                session.add(row)
                session.flush()
                months_back = self.rng.choice((1, 2)) if self.rng.random() < backdated_share else 0
                anchor = now - timedelta(days=32 * months_back, seconds=5)
                sub = Subscription(
                    customer_id=customer.id,
                    plan_id=plan_id,
                    card_id=row.id,
                    status="active",
                    anchor_at=anchor,
                    next_period_index=0,
                    next_billing_at=anchor,
                    created_at=now,
                    updated_at=now,
                )
                session.add(sub)
                subs.append(sub)
            session.flush()
            ids = [s.id for s in subs]
        return Seeded(ids, dict(zip(ids, numbers, strict=True)))

    def _remote_card(self, number: str) -> tuple[str, Any, str]:
        customer = self.gateway.create_customer(email="r@example.com")
        token = self.gateway.tokenize_card(number=number, exp_month=12, exp_year=2031, holder_name="Rel Test")
        return customer.id, self.gateway.associate_card(customer.id, token), token

    def plan_interval(self) -> dict[int, tuple[str, int]]:
        with self.ctx.sessions() as session:
            return {p.id: (p.interval, p.interval_count) for p in session.execute(select(Plan)).scalars()}

    def expected_periods(self, now: datetime | None = None) -> dict[int, list[int]]:
        """Every period of every live subscription whose start has passed: each must have one invoice."""
        now = now or self.ctx.clock.now()
        plans = self.plan_interval()
        with self.ctx.sessions() as session:
            subs = session.execute(select(Subscription)).scalars().all()
        expected = {}
        for sub in subs:
            interval, count = plans[sub.plan_id]
            expected[sub.id] = due_period_indexes(sub.anchor_at, 0, now, interval, count, TZ)
        return expected

    def attempt_ids(self, state: str) -> set[int]:
        with self.ctx.sessions() as session:
            return set(session.execute(select(ChargeAttempt.id).where(ChargeAttempt.state == state)).scalars())

    def counts(self) -> dict[str, Any]:
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session:
            invoices = dict(session.execute(select(Invoice.state, func.count()).group_by(Invoice.state)).all())
            attempts = dict(
                session.execute(select(ChargeAttempt.state, func.count()).group_by(ChargeAttempt.state)).all()
            )
            due_open = session.execute(
                select(func.count()).where(Invoice.state == "open", Invoice.due_at <= now)
            ).scalar_one()
        return {"invoices": invoices, "attempts": attempts, "due_open": due_open}

    def settled(self) -> bool:
        """Every due period has its invoice, none is waiting to be charged, no attempt is in flight."""
        expected = sum(len(v) for v in self.expected_periods().values())
        counts = self.counts()
        in_flight = counts["attempts"].get("pending", 0) + counts["attempts"].get("sending", 0)
        return sum(counts["invoices"].values()) >= expected and counts["due_open"] == 0 and in_flight == 0

    def wait_settled(self, timeout_seconds: float) -> bool:
        """Wait until settled() holds twice in a row; False on timeout (the proof then says what is left)."""
        deadline = time.monotonic() + timeout_seconds
        streak = 0
        while time.monotonic() < deadline:
            streak = streak + 1 if self.settled() else 0
            if streak >= 2:
                return True
            time.sleep(0.5)
        return False

    def wait_for(self, sql: str, what: str, timeout_seconds: float = 30, **params: Any) -> Any:
        """Poll a scalar SQL query until it returns something truthy."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            with self.ctx.sessions() as session:
                value = session.execute(text(sql), params).scalar()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: timed out waiting for {what}\n{self.logs()[-3000:]}")
            time.sleep(0.05)

    def terminate_worker_connections(self) -> int:
        """pg_terminate_backend for this test's worker connections only (by application_name)."""
        with self.ctx.sessions() as session, session.begin():
            return len(
                session.execute(
                    text(
                        "select pg_terminate_backend(pid) from pg_stat_activity "
                        "where application_name = :name and pid <> pg_backend_pid()"
                    ),
                    {"name": f"{self.tag}-worker"},
                ).all()
            )


# --- the workers' logs ---------------------------------------------------------------------------------

_SUCCEEDED = re.compile(r"Task (billing\.\w+)\[([0-9a-f-]+)\] succeeded in [\d.]+s: (\{.*\})")
_RECEIVED = re.compile(r"Task (billing\.\w+)\[([0-9a-f-]+)\] received")


def results(log: str, name: str = "billing.charge_invoice") -> list[tuple[str, dict[str, Any]]]:
    """(task id, result dict) of every success of task `name` in the logs."""
    found = []
    for match in _SUCCEEDED.finditer(log):
        if match.group(1) == name:
            with contextlib.suppress(ValueError, SyntaxError):
                found.append((match.group(2), ast.literal_eval(match.group(3))))
    return found


CHARGE_TASKS = ("billing.charge_invoice", "billing.charge_invoices")  # one invoice, or a batch of them


def received(log: str, names: tuple[str, ...] = CHARGE_TASKS) -> list[str]:
    return [m.group(2) for m in _RECEIVED.finditer(log) if m.group(1) in names]


def outcomes(log: str) -> Counter[str]:
    """Charge outcomes in the workers' results: one per billing.charge_invoice, a count per batch."""
    counts: Counter[str] = Counter(str(r.get("outcome")) for _, r in results(log))
    for _, batch in results(log, "billing.charge_invoices"):
        counts.update({str(k): int(v) for k, v in dict(batch.get("outcomes") or {}).items()})
    return counts


@contextlib.contextmanager
def timed(figures: dict[str, Any], key: str = "seconds") -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        figures[key] = round(time.monotonic() - started, 1)


class Phases:
    """Wall time of a scenario's phases, for the figures: `with phases("kills"): ...`."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.seconds: dict[str, float] = {}
        figures["phase_seconds"] = self.seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)
