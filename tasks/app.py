"""The Celery app: configured from the environment at import (no connections made), tasks in sibling modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

from celery import Celery, Task, signals

from billing.config import Settings
from tasks import logs, monitor, resilience
from tasks.base import BillingTask
from tasks.config import TaskSettings, celery_config
from tasks.wiring import Runtime, tune_garbage_collector

# Loads `.env` (without overriding the environment) and fails fast on a malformed setting.
Settings.from_env()
task_settings = TaskSettings.from_env(os.environ)

# Only our tasks get BillingTask (see `task`); Celery's built-in tasks keep their own base.
app = Celery("billing")
app.conf.update(celery_config(task_settings))

runtime = Runtime(app, task_settings)
# Celery logs the whole body of a message it cannot run (a misspelled task name): keep tokens out of it.
logs.install()
# Flower keeps the arguments a SENDER put in its task-sent event: only our worker's masked ones may show.
monitor.install()
# A worker must reconnect after a broker restart, not exit on a kombu AttributeError (see tasks.resilience).
resilience.install()


def task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """`app.task` with an explicit, stable name and the BillingTask base (typed for mypy: the result is a Task)."""
    return cast(Callable[[Callable[..., Any]], Task], app.task(name=name, base=BillingTask, **options))


def _warm_up_worker(sender: Any = None, **_: Any) -> None:
    """A threads (or solo) worker warms up before it logs "ready." (prefork warms up in each child instead:
    threads and connections made here would not survive the fork)."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if not isinstance(getattr(sender, "pool", None), PreforkPool):
        _warm_up_pool_process()


def _warm_up_pool_process(**_: Any) -> None:
    """Prepare the process that runs tasks: its warm start, then its garbage collector."""
    runtime.warm_up()
    tune_garbage_collector()


signals.worker_ready.connect(_warm_up_worker, weak=False)
signals.worker_process_init.connect(_warm_up_pool_process, weak=False)
