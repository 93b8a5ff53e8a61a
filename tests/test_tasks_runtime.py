"""The worker's service Context: built lazily, once per process, shared by threads, rebuilt after a fork."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

import tasks
from billing.bootstrap import build_context
from billing.config import Settings
from tasks import wiring as wiring_module
from tasks.config import TaskSettings
from tasks.testing import CeleryProcess, process_env
from tasks.wiring import CeleryPublisher, Runtime


class FakeEngine:
    """Records how it was disposed."""

    def __init__(self) -> None:
        self.disposed: list[bool] = []

    def dispose(self, close: bool = True) -> None:
        self.disposed.append(close)


def _fake_context() -> Any:
    return SimpleNamespace(sessions=SimpleNamespace(kw={"bind": FakeEngine()}))


def test_threads_share_one_context_built_on_first_use() -> None:
    built: list[Any] = []
    runtime = Runtime(tasks.app, TaskSettings())

    def factory() -> Any:
        built.append(_fake_context())
        return built[-1]

    runtime.use_factory(factory)
    assert built == []  # nothing at construction
    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(runtime.context())) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1
    assert all(ctx is built[0] for ctx in seen)


def test_a_forked_child_builds_its_own_context_and_leaves_the_parents_connections_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = Runtime(tasks.app, TaskSettings())
    runtime.use_factory(_fake_context)
    parent = runtime.context()
    monkeypatch.setattr(wiring_module.os, "getpid", lambda: -42)
    child = runtime.context()
    assert child is not parent
    assert parent.sessions.kw["bind"].disposed == [False]  # dropped, not closed under the parent's feet
    assert runtime.context() is child


class RecordingApp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.calls.append((name, options))


@pytest.mark.parametrize(
    ("name", "queue"),
    [
        ("billing.charge_invoice", "billing.charges"),
        ("billing.execute_refund", "billing.refunds"),
        ("billing.something_new", "billing.default"),
    ],
)
def test_the_outbox_publisher_sends_each_intent_to_its_queue(name: str, queue: str) -> None:
    app = RecordingApp()
    CeleryPublisher(app).publish(name, {"invoice_id": 1})  # type: ignore[arg-type]
    assert app.calls == [(name, {"kwargs": {"invoice_id": 1}, "queue": queue})]


def test_warm_up_connects_to_the_database_once(sqlite_url: str) -> None:
    from billing.db import migrate
    from billing.db.engine import make_engine
    from tests.fakes import FakeGateway

    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    connects: list[int] = []
    event.listen(engine, "connect", lambda *_: connects.append(1))
    runtime = Runtime(tasks.app, TaskSettings())
    runtime.use_factory(lambda: build_context(Settings(database_url=sqlite_url), engine=engine, gateway=FakeGateway()))
    runtime.warm_up()
    assert connects == [1]


def test_warm_up_with_the_database_down_still_starts_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    def unreachable() -> Any:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    runtime = Runtime(tasks.app, TaskSettings())
    runtime.use_factory(unreachable)
    with caplog.at_level(logging.WARNING, logger="billing.tasks"):
        runtime.warm_up()  # does not raise: the first task connects (and retries) as usual
    assert "warm start: no database connection yet (OperationalError)" in caplog.text


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_real_worker_checks_its_database_before_it_says_ready_and_starts_anyway_when_it_is_down(
    tmp_path: Path, pool: str
) -> None:
    # Given a worker (embedded broker, no server needed) whose database does not answer
    env = process_env(
        {
            "DATABASE_URL": "postgresql://billing@127.0.0.1:9/billing",  # the discard port: refused
            "CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path}/broker.db",
            "TPAGA_PRIVATE_KEY": "pk_test",
            "TPAGA_PUBLIC_KEY": "pub_test",
            "BILLING_WORKER_POOL": pool,
        }
    )
    args = ["worker", "--loglevel", "INFO", "--concurrency", "1", "--without-mingle", "--without-gossip"]
    with CeleryProcess(args, env, tmp_path / "worker.log") as proc:  # no --pool: the app's (the environment's)
        # Then it says why (once per process that will run tasks) and still starts
        proc.wait_for_log(r"ready\.", 60)
        where = proc.wait_for_log(r"/(\w+)-?\d*\] warm start: no database connection yet \(OperationalError\)", 30)
        # (prefork: in the pool's child, whose connections are its own; not in the parent before the fork)
        assert where.group(1) == ("ForkPoolWorker" if pool == "prefork" else "MainProcess")
        # and tunes the garbage collector in that same process, after the warm start
        tuned = proc.wait_for_log(
            r"/(\w+)-?\d*\] garbage collector: (\d+) objects loaded before the first task frozen", 30
        )
        assert tuned.group(1) == where.group(1) and int(tuned.group(2)) > 10_000
        assert f"({'prefork' if pool == 'prefork' else 'thread'})" in proc.log_text()  # the pool asked for
        assert "Traceback" not in proc.log_text()


def test_tuning_the_garbage_collector_freezes_what_is_loaded_and_collects_the_young_less_often() -> None:
    # In a process of its own: freezing this test process's objects would outlive the test.
    script = (
        "import gc, tasks.wiring as w; before = gc.get_threshold(); w.tune_garbage_collector();"
        "print(gc.get_freeze_count(), *before, *gc.get_threshold())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=process_env({}), check=True
    )
    frozen, *thresholds = (int(n) for n in done.stdout.split())
    before, after = thresholds[:3], thresholds[3:]
    assert frozen > 10_000  # the imported app: Celery, SQLAlchemy, billing
    # the youngest generation's threshold is ours (Python's default is 700 on 3.11), the older two untouched
    assert after == [wiring_module.GC_YOUNG_THRESHOLD, *before[1:]]
    assert before[0] < wiring_module.GC_YOUNG_THRESHOLD
