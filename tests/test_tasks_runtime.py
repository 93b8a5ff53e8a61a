"""The worker's service Context: built lazily, once per process, shared by threads, rebuilt after a fork."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

import tasks
from tasks import wiring as wiring_module
from tasks.config import TaskSettings
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
