"""Celery configuration from the environment: queues, routes, time limits, the beat schedule.

Pure: `celery_config(env)` returns a dict and touches nothing (no broker, no database), so it is cheap to
test and safe to call at import time.

Time budget (seconds), in the order that must hold, checked by `celery_config`:

    gateway call  <= ~35   connect 3.05 s x tenacity's retries within 10 s, then a 20 s read timeout
    soft limit       120   BILLING_TASK_SOFT_TIME_LIMIT: SoftTimeLimitExceeded raised inside the task
    hard limit       150   BILLING_TASK_TIME_LIMIT: the pool process is killed (prefork only, see below)
    retry countdown  <= 60 transient database errors; never more than the visibility timeout
    sending lease    300   BILLING_SENDING_LEASE_SECONDS (billing.config): an attempt older is reconciled
    visibility      1800   BILLING_VISIBILITY_TIMEOUT: Redis redelivers an unacknowledged message after this

Celery enforces time limits only in the prefork pool; the default threads pool cannot interrupt a thread,
so there the gateway's connect/read timeouts are what bound a task (they are set well below the limits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from kombu.entity import Exchange, Queue

from billing import task_names
from billing.config import DEFAULT_BROKER_URL, ConfigError

CHARGES = "billing.charges"
REFUNDS = "billing.refunds"
SCHEDULER = "billing.scheduler"
DEFAULT = "billing.default"
# The event stream's delivery: a slow or dead receiver must never hold up billing's queues.
EVENTS = "billing.events"
QUEUE_NAMES = (CHARGES, REFUNDS, SCHEDULER, DEFAULT, EVENTS)

# Task names live in billing.task_names (the services' outbox intents use them too); re-exported here.
CHARGE_INVOICE = task_names.CHARGE_INVOICE
CHARGE_INVOICES = task_names.CHARGE_INVOICES
REQUEST_REFUND = task_names.REQUEST_REFUND
ATTACH_CARD = task_names.ATTACH_CARD
CANCEL_SUBSCRIPTION = task_names.CANCEL_SUBSCRIPTION
EXECUTE_REFUND = task_names.EXECUTE_REFUND
UPSERT_PLAN = task_names.UPSERT_PLAN
UPSERT_CUSTOMER = task_names.UPSERT_CUSTOMER
CREATE_SUBSCRIPTION = task_names.CREATE_SUBSCRIPTION
PAUSE_SUBSCRIPTION = task_names.PAUSE_SUBSCRIPTION
RESUME_SUBSCRIPTION = task_names.RESUME_SUBSCRIPTION
COMMANDS = task_names.COMMANDS
OPEN_DUE_INVOICES = task_names.OPEN_DUE_INVOICES
ENQUEUE_DUE_INVOICES = task_names.ENQUEUE_DUE_INVOICES
RUN_REFUNDS = task_names.RUN_REFUNDS
RECONCILE = task_names.RECONCILE
RELAY_OUTBOX = task_names.RELAY_OUTBOX
DELIVER_EVENTS = task_names.DELIVER_EVENTS

PUBLIC_TASKS = task_names.PUBLIC_TASKS
PERIODIC_TASKS = task_names.PERIODIC_TASKS
ALL_TASKS = task_names.ALL_TASKS

# The keyword arguments of every task (the contract; a test checks the task signatures against it) and the
# ones that are secret: masked in argsrepr/kwargsrepr everywhere (logs, events, Flower).
KWARGS: dict[str, tuple[str, ...]] = {
    CHARGE_INVOICE: ("invoice_id",),
    CHARGE_INVOICES: ("invoice_ids",),
    REQUEST_REFUND: ("reason", "invoice_id", "charge_id"),
    ATTACH_CARD: ("token", "customer_id", "external_customer_id", "request_id", "issued_at"),
    CANCEL_SUBSCRIPTION: (
        "subscription_id",
        "external_subscription_id",
        "at_period_end",
        "refund_last_charge",
        "request_id",
        "issued_at",
    ),
    UPSERT_PLAN: (
        "code",
        "amount",
        "currency",
        "interval",
        "interval_count",
        "trial_days",
        "name",
        "tax",
        "tax_rate",
        "request_id",
        "issued_at",
    ),
    UPSERT_CUSTOMER: ("external_id", "email", "first_name", "last_name", "phone", "request_id", "issued_at"),
    CREATE_SUBSCRIPTION: (
        "external_id",
        "external_customer_id",
        "plan_code",
        "trial_days",
        "anchor_at",
        "request_id",
        "issued_at",
    ),
    PAUSE_SUBSCRIPTION: ("external_subscription_id", "resumes_at", "request_id", "issued_at"),
    RESUME_SUBSCRIPTION: ("external_subscription_id", "request_id", "issued_at"),
    EXECUTE_REFUND: ("refund_id",),
    **{name: () for name in PERIODIC_TASKS},
}
SECRET_KWARGS: dict[str, frozenset[str]] = {ATTACH_CARD: frozenset({"token"})}

# Slow gateway calls (charges) get their own queue so they cannot starve refunds (which race the void
# window) or the scheduler's periodic tasks.
ROUTES: dict[str, str] = {
    CHARGE_INVOICE: CHARGES,
    CHARGE_INVOICES: CHARGES,
    REQUEST_REFUND: REFUNDS,
    EXECUTE_REFUND: REFUNDS,
    **{name: DEFAULT for name in COMMANDS},
    **{name: SCHEDULER for name in PERIODIC_TASKS},
    DELIVER_EVENTS: EVENTS,
}

# (task name, environment variable, default seconds)
BEAT_INTERVALS: tuple[tuple[str, str, int], ...] = (
    (OPEN_DUE_INVOICES, "BILLING_BEAT_OPEN_SECONDS", 10),
    (ENQUEUE_DUE_INVOICES, "BILLING_BEAT_SWEEP_SECONDS", 30),
    (RUN_REFUNDS, "BILLING_BEAT_REFUNDS_SECONDS", 30),
    (RECONCILE, "BILLING_BEAT_RECONCILE_SECONDS", 60),
    (RELAY_OUTBOX, "BILLING_BEAT_OUTBOX_SECONDS", 15),
    (DELIVER_EVENTS, "BILLING_BEAT_EVENTS_SECONDS", 2),
)

POOLS = ("threads", "prefork", "solo", "eventlet", "gevent")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_CHARGE_BATCH = 1000
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://")


def _gateway_concurrency_variable(env: Mapping[str, str]) -> str:
    """BILLING_GATEWAY_CONCURRENCY, or its older name BILLING_GATEWAY_THREADS when only that is set (a
    deployment that sets the old name keeps its value)."""
    if env.get("BILLING_GATEWAY_CONCURRENCY") or not env.get("BILLING_GATEWAY_THREADS"):
        return "BILLING_GATEWAY_CONCURRENCY"
    return "BILLING_GATEWAY_THREADS"


@dataclass(frozen=True)
class TaskSettings:
    """The worker-side knobs that are not in `billing.config.Settings`."""

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None
    worker_pool: str = "threads"
    worker_concurrency: int = 32
    prefetch_multiplier: int = 1
    # Invoices per billing.charge_invoices message (1: one billing.charge_invoice each), and the charges one
    # worker process keeps in flight at Tpaga on its event loop (in flight = rate x latency; a multiple of the
    # batch size lets whole batches go out at once).
    charge_batch_size: int = 100
    gateway_concurrency: int = 300
    soft_time_limit_seconds: int = 120
    time_limit_seconds: int = 150
    visibility_timeout_seconds: int = 1800
    retry_backoff_max_seconds: int = 60
    max_retries: int = 8
    # A command naming an object not there yet (it overtook the command creating it) is retried this long.
    command_wait_seconds: int = 900
    # A due invoice is re-enqueued by the sweep only after it waited this long (its own message is late).
    sweep_grace_seconds: int = 60
    sweep_limit: int = 1000
    outbox_min_age_seconds: int = 5
    # Events are kept this long (and replayable) once delivered everywhere; a backlog is kept until delivered.
    event_retention_days: int = 90
    # Webhooks in flight per process (coroutines; the name predates them). 256 kept the benchmark's passes of
    # 2,000 to a 20 ms receiver off its latency, but one endpoint then gets 256 connections at once, past a small
    # receiver's listen backlog (the reliability test's server: 5): its deliveries failed and backed off.
    delivery_threads: int = 64
    # A worker's and beat's log level when `--loglevel` is not given (Celery's own default, WARNING, hides
    # every task a worker runs).
    log_level: str = "INFO"
    beat_seconds: tuple[tuple[str, int], ...] = tuple((name, default) for name, _, default in BEAT_INTERVALS)

    def beat_interval(self, task_name: str) -> int:
        return dict(self.beat_seconds)[task_name]

    @property
    def sweep_grace(self) -> timedelta:
        return timedelta(seconds=self.sweep_grace_seconds)

    @property
    def is_redis(self) -> bool:
        return self.broker_url.startswith(REDIS_SCHEMES)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TaskSettings:
        env = os.environ if env is None else env
        pool = env.get("BILLING_WORKER_POOL") or "threads"
        if pool not in POOLS:
            raise ConfigError(f"BILLING_WORKER_POOL must be one of {', '.join(POOLS)}; got {pool!r}")
        log_level = (env.get("BILLING_LOG_LEVEL") or "INFO").strip().upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                f"BILLING_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}; got {env.get('BILLING_LOG_LEVEL')!r}"
            )
        settings = cls(
            broker_url=env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
            result_backend=env.get("CELERY_RESULT_BACKEND") or None,
            worker_pool=pool,
            worker_concurrency=_int(env, "BILLING_WORKER_CONCURRENCY", 32, 1),
            prefetch_multiplier=_int(env, "BILLING_WORKER_PREFETCH_MULTIPLIER", 1, 1),
            charge_batch_size=_int(env, "BILLING_CHARGE_BATCH_SIZE", 100, 1),
            gateway_concurrency=_int(env, _gateway_concurrency_variable(env), 300, 1),
            soft_time_limit_seconds=_int(env, "BILLING_TASK_SOFT_TIME_LIMIT", 120, 1),
            time_limit_seconds=_int(env, "BILLING_TASK_TIME_LIMIT", 150, 1),
            visibility_timeout_seconds=_int(env, "BILLING_VISIBILITY_TIMEOUT", 1800, 1),
            command_wait_seconds=_int(env, "BILLING_COMMAND_WAIT_SECONDS", 900, 0),
            sweep_grace_seconds=_int(env, "BILLING_SWEEP_GRACE_SECONDS", 60, 0),
            sweep_limit=_int(env, "BILLING_SWEEP_LIMIT", 1000, 1),
            outbox_min_age_seconds=_int(env, "BILLING_OUTBOX_MIN_AGE_SECONDS", 5, 0),
            event_retention_days=_int(env, "BILLING_EVENT_RETENTION_DAYS", 90, 1),
            delivery_threads=_int(env, "BILLING_DELIVERY_THREADS", 64, 1),
            log_level=log_level,
            beat_seconds=tuple((name, _int(env, var, default, 1)) for name, var, default in BEAT_INTERVALS),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ConfigError unless visibility timeout > hard limit > soft limit > 0 and retries fit inside."""
        if self.charge_batch_size > MAX_CHARGE_BATCH:
            raise ConfigError(
                f"BILLING_CHARGE_BATCH_SIZE must be at most {MAX_CHARGE_BATCH}, got {self.charge_batch_size}"
            )
        if not self.time_limit_seconds > self.soft_time_limit_seconds:
            raise ConfigError(
                f"BILLING_TASK_TIME_LIMIT ({self.time_limit_seconds}) must be greater than "
                f"BILLING_TASK_SOFT_TIME_LIMIT ({self.soft_time_limit_seconds})"
            )
        if not self.visibility_timeout_seconds > self.time_limit_seconds:
            raise ConfigError(
                f"BILLING_VISIBILITY_TIMEOUT ({self.visibility_timeout_seconds}) must be greater than "
                f"BILLING_TASK_TIME_LIMIT ({self.time_limit_seconds}), or Redis redelivers running tasks"
            )
        if not self.visibility_timeout_seconds > self.retry_backoff_max_seconds:
            raise ConfigError("BILLING_VISIBILITY_TIMEOUT must exceed the longest retry countdown (60 s)")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def queues() -> tuple[Queue, ...]:
    """The queues, each on a direct exchange of its own name: exactly what a bare Celery app that sends
    with `queue="billing.charges"` declares, so foreign senders and our workers agree on the bindings."""
    return tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
        for name in QUEUE_NAMES
    )


def beat_schedule(settings: TaskSettings) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "task": name,
            "schedule": float(settings.beat_interval(name)),
            # A periodic message older than its interval is useless: the next one is already on its way.
            "options": {"queue": ROUTES[name], "expires": float(settings.beat_interval(name))},
        }
        for name in PERIODIC_TASKS
    }


def celery_config(settings: TaskSettings) -> dict[str, Any]:
    """Everything `app.conf` gets; see the module docstring for the time budget."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickle payload on a shared broker is remote code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # Re-run what a dead worker was doing (the services are idempotent against the database).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "task_soft_time_limit": settings.soft_time_limit_seconds,
        "task_time_limit": settings.time_limit_seconds,
        "worker_pool": settings.worker_pool,
        "worker_concurrency": settings.worker_concurrency,
        # Flower needs both.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
        "timezone": "UTC",
        "task_queues": queues(),
        "task_default_queue": DEFAULT,
        "task_default_exchange": DEFAULT,
        "task_default_routing_key": DEFAULT,
        "task_routes": {name: {"queue": queue} for name, queue in ROUTES.items()},
        "task_create_missing_queues": True,
        "beat_schedule": beat_schedule(settings),
    }
    if settings.is_redis:
        # Only for Redis: kombu's SQLAlchemy transport passes transport options to create_engine().
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "fanout_prefix": True,
            "fanout_patterns": True,
        }
    if settings.result_backend:
        conf.update(
            result_backend=settings.result_backend,
            task_ignore_result=False,
            result_expires=timedelta(days=1),
            result_extended=False,
        )
        if settings.result_backend.startswith(REDIS_SCHEMES):
            conf["result_backend_transport_options"] = {"visibility_timeout": settings.visibility_timeout_seconds}
    else:
        conf["task_ignore_result"] = True
    return conf
