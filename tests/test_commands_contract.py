"""The command contract of issue 13, end to end: another app signs 60 customers up by its own ids.

The sender is a bare `Celery()` that imports nothing from this project (`tests/procs.py::SENDER`); it talks to
two real `celery -A tasks worker` processes and a beat on Redis and PostgreSQL, which call the emulator over
HTTP. Every command is sent twice; one pair of each kind is released at once so that its copies race on the two
workers; a third of the cards and subscriptions are sent before their customer; some commands arrive late (an
`issued_at` older than what was applied) and some reuse a request_id with other parameters. The end state must
be the one a single in-order delivery gives: one customer and one card per customer at Tpaga, one approved
charge per subscription, the newest emails, and every refusal recorded with its documented reason.

The counts are printed and written to /tmp/billing-contract-counts.json for the issue's closing note.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from billing.db import migrate
from billing.db.models import Card, CardToken, ChargeAttempt, Command, Customer, Event, Invoice, Plan, Subscription
from billing.gateway import TpagaClient
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY
from tasks.testing import CeleryProcess, private_redis_db, process_env, worker
from tests.procs import Send, send_by_name

pytestmark = [pytest.mark.celery, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

COUNTS_FILE = Path("/tmp/billing-contract-counts.json")
N = 60
PLAN = "contract-monthly"
DEFAULT = "billing.default"
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # when the other app issued its first command (any past time works)

EARLY = [i for i in range(N) if i % 3 == 0]  # their attach_card and create_subscription go before upsert_customer
RACE = 59  # the customer whose three commands are each sent as a pair released at once
STALE = (10, 20, 31, 41)  # a newer upsert_customer is applied, then an older one arrives (10, 20 with request_ids)
REUSE = {"upsert_customer": 4, "attach_card": 8, "create_subscription": 14}  # request_id reused, other params
REUSE_LABEL = {"upsert_customer": "upsert", "attach_card": "card", "create_subscription": "sub"}

_TERMINAL = re.compile(r"Task (billing\.\w+)\[([0-9a-f-]{36})\] (succeeded in|raised expected:|raised unexpected:)(.*)")
_WAITING = re.compile(r"billing\.\w+\[([0-9a-f-]{36})\]: .*; waiting, retry in")
_RECEIVED = re.compile(r"Task (billing\.\w+)\[([0-9a-f-]{36})\] received")


def ext(i: int) -> str:
    return f"cus-{i:02d}"


def sub_ext(i: int) -> str:
    return f"sub-{i:02d}"


def rid(i: int, what: str) -> dict[str, str]:
    """Even customers' commands carry request_ids; odd ones rely on their external ids alone."""
    return {"request_id": f"c{i:02d}-{what}"} if i % 2 == 0 else {}


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def email(i: int) -> str:
    return f"c{i:02d}.new@example.com" if i in STALE else f"c{i:02d}@example.com"


def upsert_customer(i: int, *, newest: bool = True) -> dict[str, Any]:
    """The customer's command; for STALE customers `newest=False` is the older version, issued 1000 s earlier."""
    kwargs: dict[str, Any] = {
        "external_id": ext(i),
        "email": email(i) if newest else f"c{i:02d}@old.example.com",
        "first_name": f"C{i:02d}",
        "last_name": "Contract",
        "issued_at": at(1000 + i if (newest and i in STALE) else i),
    }
    version = "upsert-2" if (newest and i in STALE) else "upsert"
    return kwargs | rid(i, version)


def attach_card(i: int, token: str) -> dict[str, Any]:
    return {"token": token, "external_customer_id": ext(i), "issued_at": at(2000 + i)} | rid(i, "card")


def create_subscription(i: int) -> dict[str, Any]:
    kwargs = {"external_id": sub_ext(i), "external_customer_id": ext(i), "plan_code": PLAN, "trial_days": 0}
    return kwargs | {"issued_at": at(3000 + i)} | rid(i, "sub")


def plan(*, stale: bool = False) -> dict[str, Any]:
    return {
        "code": PLAN,
        "amount": "45000",
        "currency": "COP",
        "interval": "month",
        "name": "Monthly (draft)" if stale else "Monthly",
        "request_id": "plan-v1" if stale else "plan-v2",
        "issued_at": at(-10 if stale else 0),
    }


def twice(key: str, name: str, kwargs: dict[str, Any]) -> list[Send]:
    return [(f"{key}#1", name, DEFAULT, [], kwargs), (f"{key}#2", name, DEFAULT, [], kwargs)]


class Run:
    """What the test sent (task id -> key) and what the workers logged about it."""

    def __init__(self, broker: str, workers: list[CeleryProcess], engine: Engine) -> None:
        self.broker = broker
        self.workers = workers
        self.engine = engine
        self.sent: dict[str, str] = {}  # task id -> key
        self.keys: dict[str, str] = {}  # key -> task id
        self.names: dict[str, str] = {}  # task id -> task name

    def send(self, sends: list[Send], *, together: bool = False) -> None:
        names = {key: name for key, name, *_ in sends}
        for key, task_id in send_by_name(self.broker, sends, together=together):
            assert key not in self.keys, key
            self.names[task_id] = names[key]
            self.sent[task_id] = key
            self.keys[key] = task_id

    def logs(self) -> list[str]:
        return [w.log_text() for w in self.workers]

    def terminal(self) -> dict[str, tuple[str, str]]:
        """task id -> (how it ended, the rest of the line), for the tasks this test sent."""
        ended: dict[str, tuple[str, str]] = {}
        for text in self.logs():
            for match in _TERMINAL.finditer(text):
                if match.group(2) in self.sent:
                    assert match.group(2) not in ended, f"{self.sent[match.group(2)]} ended twice"
                    ended[match.group(2)] = (match.group(3), match.group(4))
        return ended

    def all_ended(self) -> dict[str, tuple[str, str]] | None:
        ended = self.terminal()
        return ended if len(ended) == len(self.sent) else None

    def waited(self) -> set[str]:
        """Keys of the commands that were retried because what they name was not there yet."""
        found = (m.group(1) for text in self.logs() for m in _WAITING.finditer(text))
        return {self.sent[task_id] for task_id in found if task_id in self.sent}

    def first_worker(self, key: str) -> int | None:
        """Which worker received `key` first (a copy that had to wait is received again, maybe elsewhere)."""
        task_id = self.keys[key]
        seen = []
        for n, text in enumerate(self.logs()):
            for line in text.splitlines():
                match = _RECEIVED.search(line)
                if match and match.group(2) == task_id:
                    seen.append((line[:25], n))  # "[2026-01-05 09:00:00,123:": the worker's log time
                    break
        return min(seen)[1] if seen else None

    def pending(self) -> str:
        """The commands sent that have not ended, for a failure message."""
        ended = self.terminal()
        return ", ".join(sorted(key for task_id, key in self.sent.items() if task_id not in ended))

    def db(self, check: Callable[[Session], Any], what: str | Callable[[], str], timeout_seconds: float = 60) -> Any:
        deadline = time.monotonic() + timeout_seconds
        while True:
            with Session(self.engine) as session:
                value = check(session)
            if value:
                return value
            if time.monotonic() > deadline:
                tails = "\n".join(text[-2500:] for text in self.logs())
                what = what() if callable(what) else what
                pytest.fail(f"timed out after {timeout_seconds}s waiting for {what}; worker logs:\n{tails}")
            time.sleep(0.2)


def applied(request_id: str) -> Callable[[Session], bool]:
    return lambda s: (
        s.execute(select(Command.status).where(Command.request_id == request_id)).scalar_one_or_none() == "applied"
    )


@pytest.fixture
def redis_db_url(redis_server_url: str) -> Iterator[str]:
    with private_redis_db(redis_server_url) as url:
        yield url


def test_sixty_customers_signed_up_by_another_app_end_in_the_state_of_one_in_order_delivery(
    pg_url: str, sandbox: Any, redis_db_url: str, tmp_path: Path
) -> None:
    migrate.upgrade(pg_url)
    engine = create_engine(pg_url)
    # The app's frontend tokenizes each card at Tpaga (one spare token for a request_id reused with it).
    gateway = TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    with ThreadPoolExecutor(8) as pool:
        tokens = list(
            pool.map(
                lambda n: gateway.tokenize_card(
                    number="4111111111111111", exp_month=12, exp_year=2031, holder_name=f"C{n:02d} Contract"
                ),
                range(N + 1),
            )
        )
    gateway.close()
    spare_token = tokens.pop()

    env = process_env(
        {
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": redis_db_url,
            "TPAGA_API_URL": sandbox.api_url,
            "TPAGA_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
            "TPAGA_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
            "BILLING_WORKER_CONCURRENCY": "4",
            # Invoices of new subscriptions are opened and relayed on the beat's ticks: short ones keep this fast.
            "BILLING_BEAT_OPEN_SECONDS": "1",
            "BILLING_BEAT_OUTBOX_SECONDS": "1",
            "BILLING_OUTBOX_MIN_AGE_SECONDS": "1",
        }
    )
    workers = [worker(env, tmp_path / f"worker-{n}.log", "--concurrency", "4", name=f"contract{n}@%h") for n in (1, 2)]
    beat = CeleryProcess(["beat", "--loglevel", "INFO", "-s", str(tmp_path / "schedule")], env, tmp_path / "beat.log")
    started = time.monotonic()
    try:
        for proc in workers:
            proc.start()
        for proc in workers:
            proc.wait_for_log(r"ready\.", 60)
        beat.start()
        run = Run(redis_db_url, workers, engine)
        scenario(run, tokens, spare_token)
        counts = check_end_state(run, sandbox, [*tokens, spare_token])
    finally:
        beat.stop()
        for proc in workers:
            proc.stop()
        engine.dispose()
    counts["seconds"] = round(time.monotonic() - started, 1)
    COUNTS_FILE.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    print(json.dumps(counts, indent=2, sort_keys=True))


def scenario(run: Run, tokens: list[str], spare_token: str) -> None:
    """Send every command the way the docstring says; returns once the late and reused ones are sent."""
    # The plan, then each of RACE's commands, as pairs released together (once what they name exists).
    run.send(twice("plan", "billing.upsert_plan", plan()), together=True)
    run.db(applied("plan-v2"), "the plan")
    run.send(twice(f"customer-{RACE}", "billing.upsert_customer", upsert_customer(RACE)), together=True)
    run.db(
        lambda s: s.execute(
            select(Customer.tpaga_customer_id).where(Customer.merchant_customer_id == ext(RACE))
        ).scalar_one_or_none(),
        "the racing customer created at Tpaga",
    )
    run.send(twice(f"card-{RACE}", "billing.attach_card", attach_card(RACE, tokens[RACE])), together=True)
    run.db(
        lambda s: s.execute(select(Card.id).join(Customer).where(Customer.merchant_customer_id == ext(RACE))).first(),
        "the racing customer's card",
    )
    run.send(twice(f"subscription-{RACE}", "billing.create_subscription", create_subscription(RACE)), together=True)

    # Everyone else in one stream: the early third's cards and subscriptions before any customer; the stale
    # plan; then customers, cards and subscriptions (first copies of a kind, then their second copies); the
    # early third's customers last.
    others = [i for i in range(N) if i != RACE and i not in EARLY]
    stream: list[Send] = []

    def kind(key: str, name: str, who: list[int], kwargs: Callable[[int], dict[str, Any]]) -> None:
        pairs = [twice(f"{key}-{i}", name, kwargs(i)) for i in who]
        stream.extend([first for first, _ in pairs] + [second for _, second in pairs])

    kind("card", "billing.attach_card", EARLY, lambda i: attach_card(i, tokens[i]))
    kind("subscription", "billing.create_subscription", EARLY, create_subscription)
    stream.extend(twice("plan-stale", "billing.upsert_plan", plan(stale=True)))
    kind("customer", "billing.upsert_customer", others, upsert_customer)
    kind("card", "billing.attach_card", others, lambda i: attach_card(i, tokens[i]))
    kind("subscription", "billing.create_subscription", others, create_subscription)
    kind("customer", "billing.upsert_customer", EARLY, upsert_customer)
    run.send(stream)

    # Late: the older version of STALE customers, after the newer one was applied; request_ids reused with other
    # parameters, after their first command was applied.
    def has_newest_email(i: int) -> Callable[[Session], bool]:
        where = Customer.merchant_customer_id == ext(i)
        return lambda s: s.execute(select(Customer.email).where(where)).scalar_one_or_none() == email(i)

    for i in STALE:
        run.db(has_newest_email(i), f"the newest upsert_customer of {ext(i)}")
    for what, i in REUSE.items():
        run.db(applied(f"c{i:02d}-{REUSE_LABEL[what]}"), f"the first {what} of {ext(i)}")
    late: list[Send] = []
    for i in STALE:
        late += twice(f"customer-stale-{i}", "billing.upsert_customer", upsert_customer(i, newest=False))
    reused = {
        "upsert_customer": upsert_customer(REUSE["upsert_customer"]) | {"email": "someone.else@example.com"},
        "attach_card": attach_card(REUSE["attach_card"], spare_token),
        "create_subscription": create_subscription(REUSE["create_subscription"]) | {"trial_days": 7},
    }
    for what, kwargs in reused.items():
        late += twice(f"reuse-{what}", f"billing.{what}", kwargs)
    run.send(late)


def check_end_state(run: Run, sandbox: Any, tokens: list[str]) -> dict[str, Any]:
    """Wait until every command sent has ended and every subscription is paid; assert the end state."""
    ended = run.db(lambda _s: run.all_ended(), lambda: f"every command sent to end (not yet: {run.pending()})")
    run.db(
        lambda s: (
            s.execute(select(func.count()).where(Invoice.state == "paid")).scalar_one() >= N
            and not s.execute(select(func.count()).where(ChargeAttempt.state.in_(("pending", "sending")))).scalar_one()
        ),
        "one paid invoice per subscription",
        timeout_seconds=90,
    )
    logs = run.logs()

    # Every command ended once; the refused ones are exactly the late and reused ones, for their reason.
    outcomes = {run.sent[task_id]: how for task_id, (how, _) in ended.items()}
    refused = {key for key, how in outcomes.items() if how != "succeeded in"}
    expected_refused = {f"customer-stale-{i}#{n}" for i in STALE for n in (1, 2)}
    expected_refused |= {f"plan-stale#{n}" for n in (1, 2)}
    expected_refused |= {f"reuse-{what}#{n}" for what in REUSE for n in (1, 2)}
    assert refused == expected_refused
    assert "raised unexpected:" not in set(outcomes.values())
    reasons = {run.sent[task_id]: rest for task_id, (how, rest) in ended.items() if how != "succeeded in"}
    for i in STALE:
        for n in (1, 2):
            reason = reasons[f"customer-stale-{i}#{n}"]
            stale = f"billing.upsert_customer: stale: issued at {at(i)}, before the last change applied to customer"
            assert "TaskInputError" in reason and stale in reason, reason
    for what, i in REUSE.items():
        for n in (1, 2):
            assert (
                f"request_id 'c{i:02d}-{REUSE_LABEL[what]}' was already used by a billing.{what} with other parameters"
                in reasons[f"reuse-{what}#{n}"]
            )

    with Session(run.engine) as s:
        customers = {str(c.merchant_customer_id): c for c in s.execute(select(Customer)).scalars()}
        subs = list(s.execute(select(Subscription)).scalars())
        cards = list(s.execute(select(Card)).scalars())
        token_states = Counter(s.execute(select(CardToken.state)).scalars())
        invoices = Counter(s.execute(select(Invoice.state)).scalars())
        attempts = Counter(s.execute(select(ChargeAttempt.state)).scalars())
        commands = list(s.execute(select(Command)).scalars())
        rejected_events = [e.data for e in s.execute(select(Event).where(Event.kind == "command.rejected")).scalars()]
        plan_row = s.execute(select(Plan).where(Plan.code == PLAN)).scalar_one()
        paid_per_sub = Counter(s.execute(select(Invoice.subscription_id).where(Invoice.state == "paid")).scalars())

    # The early third's cards and subscriptions did arrive before their customer (and waited for it).
    waited = run.waited()
    early = {f"{kind}-{i}#{n}" for kind in ("card", "subscription") for i in EARLY for n in (1, 2)}
    assert early <= waited, sorted(early - waited)

    # The database: 60 customers with their newest emails, each created at Tpaga; 60 cards; 60 subscriptions.
    assert sorted(customers) == [ext(i) for i in range(N)]
    assert {k: c.email for k, c in customers.items()} == {ext(i): email(i) for i in range(N)}
    assert all(c.tpaga_customer_id and c.tpaga_lease_expires_at is None for c in customers.values())
    assert len({c.tpaga_customer_id for c in customers.values()}) == N
    assert len(cards) == N and len({c.customer_id for c in cards}) == N
    assert token_states == {"attached": N}  # the spare token was refused before anyone looked at it
    assert sorted(str(sub.external_id) for sub in subs) == [sub_ext(i) for i in range(N)]
    by_id = {c.id: k for k, c in customers.items()}
    assert {str(sub.external_id): by_id[sub.customer_id] for sub in subs} == {sub_ext(i): ext(i) for i in range(N)}
    assert {str(sub.status) for sub in subs} == {"active"}
    assert invoices == {"paid": N} and attempts == {"approved": N}
    assert sorted(paid_per_sub.values()) == [1] * N
    assert plan_row.name == "Monthly"

    # The command ledger: stale ones recorded as stale with the reason; the rest applied once per request_id.
    by_rid = {c.request_id: c for c in commands if c.request_id is not None}
    for i in STALE:
        stale_rows = (
            [by_rid[f"c{i:02d}-upsert"]]
            if i % 2 == 0
            else [
                c
                for c in commands
                if c.request_id is None and c.status == "stale" and f"customer {ext(i)!r}" in str(c.error)
            ]
        )
        assert len(stale_rows) == (1 if i % 2 == 0 else 2), (i, stale_rows)
        newer = at(1000 + i)
        for row in stale_rows:
            assert row.status == "stale"
            assert row.error == (
                f"stale: issued at {at(i)}, before the last change applied to customer {ext(i)!r} ({newer}); "
                "nothing was changed"
            )
    assert by_rid["plan-v1"].status == "stale"
    assert by_rid["plan-v1"].error == (
        f"stale: issued at {at(-10)}, before the last change applied to plan {PLAN!r} ({at(0)}); nothing was changed"
    )
    statuses = Counter(c.status for c in commands)
    assert statuses["rejected"] == 0  # nothing was refused but the stale ones and the reuses (which have no row)
    # One row per stale request_id (10, 20, the plan); each copy of a stale command without one (31, 41).
    assert statuses["stale"] == 2 + 2 * 2 + 1
    for what, i in REUSE.items():
        assert by_rid[f"c{i:02d}-{REUSE_LABEL[what]}"].status == "applied"  # the first outcome stands
    # A reused request_id is refused with its reason in a command.rejected event (the ledger's row is the
    # first command's), so the event stream can tell the sender.
    reuse_events = [e for e in rejected_events if "with other parameters" in str(e.get("reason"))]
    assert sorted((e["command"], e["request_id"], e["status"]) for e in reuse_events) == sorted(
        (f"billing.{what}", f"c{i:02d}-{REUSE_LABEL[what]}", "rejected") for what, i in REUSE.items() for _ in (1, 2)
    )

    # The emulator, over HTTP: exactly one customer and one card per customer, one approved charge each.
    stats = requests.get(sandbox.base_url + "__sandbox/stats", timeout=10).json()
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=30).json()
    assert stats["requests"].get("POST customer") == N
    assert stats["requests"].get("POST customer/credit_card_token") == N
    with ThreadPoolExecutor(8) as pool:
        remote = list(
            pool.map(
                lambda c: requests.get(
                    sandbox.api_url + f"customer/{c.tpaga_customer_id}", auth=(DEFAULT_PRIVATE_KEY, ""), timeout=10
                ),
                customers.values(),
            )
        )
    assert [r.status_code for r in remote] == [200] * N
    assert sorted(r.json().get("merchantCustomerId") for r in remote) == sorted(customers)
    paid = [c for c in ledger["charges"] if c["paid"]]
    assert len(ledger["charges"]) == len(paid) == N
    assert sorted(c["customer"] for c in paid) == sorted(str(c.tpaga_customer_id) for c in customers.values())
    assert sorted(c["creditCard"] for c in paid) == sorted(card.tpaga_card_id for card in cards)

    # No token reached a log.
    assert not [t for t in tokens if any(t in text for text in logs)]

    pairs = ("plan", f"customer-{RACE}", f"card-{RACE}", f"subscription-{RACE}")
    split = [key for key in pairs if {run.first_worker(f"{key}#1"), run.first_worker(f"{key}#2")} == {0, 1}]
    per_worker = Counter(n for n, text in enumerate(logs) for _ in _TERMINAL.finditer(text))
    return {
        "commands_sent": len(run.sent),
        "commands_by_task": dict(Counter(run.names.values())),
        "commands_refused": {
            "stale": len({k for k in refused if k.startswith(("customer-stale-", "plan-stale"))}),
            "request_id_reused": len({k for k in refused if k.startswith("reuse-")}),
        },
        "commands_that_waited": len(waited),
        "retries_while_waiting": sum(len(_WAITING.findall(text)) for text in logs),
        "ledger_rows": dict(statuses),
        "concurrent_pairs_split_across_workers": f"{len(split)}/{len(pairs)}",
        "tasks_ended_per_worker": [per_worker[0], per_worker[1]],
        "db": {
            "customers": len(customers),
            "cards": len(cards),
            "subscriptions": len(subs),
            "invoices": dict(invoices),
            "attempts": dict(attempts),
        },
        "emulator": {
            "customers_created": stats["requests"].get("POST customer"),
            "cards_associated": stats["requests"].get("POST customer/credit_card_token"),
            "charges": len(ledger["charges"]),
            "approved_charges": len(paid),
        },
    }
