"""Wiring of a worker process: the service Context, built lazily on first use, once per process, shared by
threads.

Never at import time (beat, Flower and `celery inspect` import the app and need no database or gateway), and
rebuilt after a fork: a prefork child must not reuse the parent's pooled connections.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db.engine import make_engine
from billing.gateway.pool import GatewayPool
from billing.services.context import Context
from tasks.config import DEFAULT, ROUTES, TaskSettings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("billing.tasks")


# Net allocations of tracked objects between two collections of the youngest generation (Python's default is
# a few hundred: far fewer than a billing burst keeps alive at once).
GC_YOUNG_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    """In a worker process that is about to run tasks (after its warm start): move everything loaded so far
    (Celery, SQLAlchemy, the app) to the collector's permanent generation, which full collections no longer
    walk, and collect the youngest generation less often.

    A billing burst keeps thousands of objects alive for a few hundred milliseconds each (a batch's rows, the
    charges in flight), so with the defaults most collections walk live objects only to promote them, and the
    collector takes a large share of a worker's CPU (PERFORMANCE.md has the measurement). Memory does not grow
    from collecting less often: a charge leaves no reference cycles to wait for a collection."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)
    log.info(
        "garbage collector: %d objects loaded before the first task frozen; youngest generation collected every %d",
        gc.get_freeze_count(),
        GC_YOUNG_THRESHOLD,
    )


class CeleryPublisher:
    """The outbox's publisher: one `send_task` per intent, on the queue the routing table names."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def publish(self, task_name: str, kwargs: dict[str, Any]) -> None:
        self._app.send_task(task_name, kwargs=kwargs, queue=ROUTES.get(task_name, DEFAULT))


class Runtime:
    """Holds the per-process Context; `context()` is cheap after the first call."""

    def __init__(self, app: Celery, task_settings: TaskSettings | Callable[[], TaskSettings]) -> None:
        """`task_settings` may be a function: the app's settings are read on first use, never at import."""
        self.app = app
        self._task_settings = task_settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._context: Context | None = None
        self._factory: Callable[[], Context] | None = None
        self._pool: tuple[int, GatewayPool] | None = None

    @property
    def task_settings(self) -> TaskSettings:
        settings = self._task_settings
        return settings if isinstance(settings, TaskSettings) else settings()

    def context(self) -> Context:
        context, pid = self._context, os.getpid()
        if context is not None and self._pid == pid:
            return context
        with self._lock:
            if self._context is None or self._pid != pid:
                inherited = self._context
                self._context = self._build()
                self._pid = pid
                if inherited is not None:
                    # Drop the parent's connections without closing them under the parent's feet.
                    bind = inherited.sessions.kw.get("bind")
                    if bind is not None:
                        bind.dispose(close=False)
            return self._context

    def gateway_pool(self) -> GatewayPool:
        """This process's pool for concurrent gateway calls (BILLING_GATEWAY_CONCURRENCY), made after a fork."""
        pool, pid = self._pool, os.getpid()
        if pool is not None and pool[0] == pid:
            return pool[1]
        with self._lock:
            if self._pool is None or self._pool[0] != pid:
                self._pool = (pid, GatewayPool(self.task_settings.gateway_concurrency))
            return self._pool[1]

    def warm_up(self) -> None:
        """Before a worker process reports ready: build the Context and open one database connection (which
        imports the driver and the dialect), so a database that is unreachable or misconfigured shows in the
        log at start rather than on billing day's first batch. Best effort: a database that is down now is not a
        reason to refuse to start; tasks connect (and retry) when they run.

        The gateway pool's event loop is NOT started here: it starts on the first batch, in the process that
        runs it, so a process that never charges a batch carries no idle loop or connections."""
        try:
            with self.context().sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # any failure here is the first task's to report
            log.warning("warm start: no database connection yet (%s); tasks connect when they run", type(exc).__name__)

    def _build(self) -> Context:
        if self._factory is not None:
            return self._factory()
        settings = Settings.from_env()
        engine_options: dict[str, Any] = {}
        if not settings.database_url.startswith("sqlite"):
            # Every worker thread may hold a connection while it waits on the gateway.
            engine_options = {"pool_size": self.task_settings.worker_concurrency, "max_overflow": 8}
        return build_context(
            settings,
            engine=make_engine(settings.database_url, **engine_options),
            publisher=CeleryPublisher(self.app),
        )

    def use_factory(self, factory: Callable[[], Context] | None) -> None:
        """Tests: build contexts with `factory` instead of from the environment (None restores)."""
        with self._lock:
            self._factory = factory
            self._context = None
            self._pid = None
