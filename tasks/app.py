"""The Celery app, configured on first use rather than at import; tasks in sibling modules.

Importing this module (or `tasks`, or `tasks.client`) reads no `.env`, raises no ConfigError and patches
nothing, so another app may import `tasks.client` whatever its working directory holds.

- The app's settings are read when something first reads `app.conf` (`LazyConfig`): the
  `celery -A tasks worker|beat|flower|inspect` commands do that before they start, so a malformed setting still
  stops them at once, with the one line the `billing` command gives (`Error: configuration: ...`, exit 1).
- A worker and beat log at `BILLING_LOG_LEVEL` (default INFO) unless `--loglevel` is given (`BillingWorker`,
  `BillingBeat`): Celery's own default, WARNING, shows none of the work a worker does.
- A process that runs this app as a service is prepared (`configure_process`: log masking, the monitor's rule,
  the broker-restart guard, the warm start of a worker) by the app's loader, which Celery asks to import the
  task modules when a worker or beat starts and Flower when it starts (`BillingLoader`); `celery events` gets
  the monitor's rule when it builds its event state (`BillingEvents`). A process that only imports the package,
  or sends with its own app, gets none of it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import click
from celery import Celery, Task, current_app, signals
from celery.app.events import Events
from celery.apps.beat import Beat
from celery.apps.worker import Worker
from celery.loaders.app import AppLoader
from kombu.utils.objects import cached_property

from billing.config import ConfigError, Settings, describe_config_error
from tasks import logs, monitor, resilience
from tasks.base import BillingTask
from tasks.config import TaskSettings, celery_config
from tasks.wiring import Runtime, tune_garbage_collector


@functools.cache
def task_settings() -> TaskSettings:
    """The worker's settings, read once per process: loads `.env` (without overriding the environment) and
    raises ConfigError on a malformed billing or worker setting."""
    Settings.from_env()
    return TaskSettings.from_env(os.environ)


class BillingLoader(AppLoader):  # type: ignore[misc]
    """Celery's loader for this app: a worker, beat (`init_worker`) and Flower call `import_default_modules`
    once, before they do any work; the process is prepared then."""

    def import_default_modules(self) -> Any:
        configure_process()
        return super().import_default_modules()


class BillingEvents(Events):  # type: ignore[misc]
    """`celery events` builds its event state from here: the monitor's rule applies to it too."""

    @cached_property
    def State(self) -> Any:  # Celery's name
        monitor.install()
        return super().State


class SettingError(ConfigError, click.ClickException):
    """Raised when the app reads a malformed setting: still a ConfigError for code that embeds the app, and a
    ClickException for the `celery` command, which then prints one line and exits 1 instead of a traceback."""

    def __init__(self, exc: ConfigError) -> None:
        click.ClickException.__init__(self, describe_config_error(exc))


def _celery_config() -> Mapping[str, Any]:
    try:
        return celery_config(task_settings())
    except ConfigError as exc:
        raise SettingError(exc) from None


def _log_level(given: Any) -> Any:
    """The level of a worker or beat that the `celery` command starts: `--loglevel` (or Celery's
    CELERY_WORKER_LOGLEVEL) when given, else BILLING_LOG_LEVEL. Started another way, as given."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source("loglevel") is not ParameterSource.DEFAULT:
        return given
    return task_settings().log_level


class BillingWorker(Worker):  # type: ignore[misc]
    """`celery worker` with the log level of `_log_level` (its banner and task list agree with it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["loglevel"] = _log_level(kwargs.get("loglevel"))
        super().__init__(*args, **kwargs)


class BillingBeat(Beat):  # type: ignore[misc]
    """`celery beat` with the log level of `_log_level`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["loglevel"] = _log_level(kwargs.get("loglevel", "WARN"))
        super().__init__(*args, **kwargs)


class BillingCelery(Celery):  # type: ignore[misc]
    """The app class: Celery's, with our worker and beat."""

    @cached_property
    def Worker(self) -> Any:  # Celery's name
        return self.subclass_with_self(BillingWorker)

    @cached_property
    def Beat(self) -> Any:  # Celery's name
        return self.subclass_with_self(BillingBeat)


# Only our tasks get BillingTask (see `task`); Celery's built-in tasks keep their own base.
app = BillingCelery("billing", loader=BillingLoader, events=BillingEvents)
runtime = Runtime(app, task_settings)


class LazyConfig(Mapping[str, Any]):
    """The app's config source, built when Celery first reads it (not at import).

    A mapping rather than an `on_configure` receiver: Celery's signals log and swallow a receiver's exception,
    which would start a worker on default settings; an error raised while Celery reads its config source
    reaches whoever read `app.conf` (the `celery` command: it stops, naming the variable)."""

    def __init__(self, build: Callable[[], Mapping[str, Any]]) -> None:
        self._build = build
        self._config: Mapping[str, Any] | None = None

    def _loaded(self) -> Mapping[str, Any]:
        if self._config is None:
            self._config = self._build()
        return self._config

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


app.config_from_object(LazyConfig(_celery_config))


def task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
    """`app.task` with an explicit, stable name and the BillingTask base (typed for mypy: the result is a Task).

    Not shared: a shared task would be added to every Celery app finalized in the process, including the app of
    a sender that imported `tasks.client`."""
    return cast(Callable[[Callable[..., Any]], Task], app.task(name=name, base=BillingTask, shared=False, **options))


_process_lock = threading.Lock()
_process_configured = False


def configure_process() -> None:
    """Prepare this process to run this app as a service (idempotent); `BillingLoader` calls it in a worker, beat
    and Flower, and an embedding program that runs the app another way calls it itself.

    - No log record carries a card token, whatever logger made it (tasks.logs).
    - Flower and `celery events` keep a task's arguments from our worker's masked events only (tasks.monitor).
    - A worker reconnects after a broker restart instead of exiting on a kombu AttributeError (tasks.resilience).
    - A worker warms up each process that will run tasks.
    """
    global _process_configured
    with _process_lock:
        if _process_configured:
            return
        logs.install()
        monitor.install()
        resilience.install()
        signals.worker_ready.connect(_warm_up_worker, weak=False, dispatch_uid="billing.warm_up_worker")
        signals.worker_process_init.connect(
            _warm_up_prefork_child, weak=False, dispatch_uid="billing.warm_up_prefork_child"
        )
        _process_configured = True


def _warm_up_worker(sender: Any = None, **_: Any) -> None:
    """A threads (or solo) worker of this app warms up before it logs "ready." (prefork warms up in each child
    instead: threads and connections made here would not survive the fork)."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if getattr(sender, "app", None) is not app:
        return
    if not isinstance(getattr(sender, "pool", None), PreforkPool):
        _warm_up_pool_process()


def _warm_up_prefork_child(**_: Any) -> None:
    """`worker_process_init`: a prefork child made the worker's app current before it sends the signal."""
    if current_app._get_current_object() is app:
        _warm_up_pool_process()


def _warm_up_pool_process(**_: Any) -> None:
    """Prepare the process that runs tasks: its warm start, then its garbage collector."""
    runtime.warm_up()
    tune_garbage_collector()
