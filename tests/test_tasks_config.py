"""The Celery app's configuration: JSON only, late acks, routing, time budget, beat schedule, public names."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

import billing
import tasks
from billing import task_names
from billing.config import ConfigError
from tasks import config
from tasks.config import TaskSettings, celery_config

app = tasks.app


def test_the_app_is_importable_as_tasks_and_builds_nothing_at_import() -> None:
    assert tasks.app.main == "billing"
    assert tasks.runtime._context is None  # no engine, no gateway until a task runs


def test_every_task_is_registered_under_its_stable_name() -> None:
    registered = {name for name in app.tasks if name.startswith("billing.")}
    assert registered == set(config.ALL_TASKS)
    assert set(config.PUBLIC_TASKS) == {
        "billing.charge_invoice",
        "billing.request_refund",
        "billing.attach_card",
        "billing.cancel_subscription",
        "billing.upsert_plan",
        "billing.upsert_customer",
        "billing.create_subscription",
        "billing.pause_subscription",
        "billing.resume_subscription",
    }


def test_every_name_in_the_task_names_module_is_registered_routed_and_documented() -> None:
    constants = {value for key, value in vars(task_names).items() if key.isupper() and isinstance(value, str)}
    assert constants == set(task_names.ALL_TASKS)  # every name is in one of the lists
    assert len(task_names.ALL_TASKS) == len(constants)  # and in only one
    for name in constants:
        assert name in app.tasks, name
        assert app.amqp.router.route({}, name, (), {})["queue"].name == config.ROUTES[name], name
        assert name in config.KWARGS, name


def _enqueue_calls() -> list[tuple[str, ast.Call]]:
    """Every `enqueue(session, now, <task name>, ...)` call in the billing package, with its module's name."""
    root = Path(billing.__file__).parent
    calls = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("billing", *path.relative_to(root).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "enqueue":
                calls.append((module.removesuffix(".__init__"), node))
    return calls


def test_the_services_outbox_intents_name_their_task_through_the_task_names_module() -> None:
    calls = _enqueue_calls()
    assert len(calls) >= 4  # invoicing (one and a batch), catalog (a new card's retry), refunds
    for module_name, call in calls:
        where = f"{module_name}:{call.lineno}"
        name_node = call.args[2]
        assert not isinstance(name_node, ast.Constant), f"{where}: a task name as a literal; use billing.task_names"
        module = importlib.import_module(module_name)
        value = eval(compile(ast.Expression(name_node), where, "eval"), vars(module))  # a name or an attribute
        assert value in task_names.ALL_TASKS, where
        assert value in app.tasks and value in config.ROUTES, where


@pytest.mark.parametrize("name", config.ALL_TASKS)
def test_task_signatures_match_the_documented_keyword_arguments(name: str) -> None:
    task = app.tasks[name]
    assert task.param_names == config.KWARGS[name]
    parameters = inspect.signature(task.run).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def test_only_json_is_accepted_and_pickle_is_refused() -> None:
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    content_type, encoding, body = dumps({"invoice_id": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=app.conf.accept_content)


def test_delivery_is_at_least_once_with_a_small_prefetch() -> None:
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1


def test_events_are_on_for_flower_and_time_is_utc() -> None:
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is True
    assert app.conf.enable_utc is True
    assert app.conf.timezone == "UTC"


@pytest.mark.parametrize(
    ("name", "queue"),
    [
        ("billing.charge_invoice", "billing.charges"),
        ("billing.request_refund", "billing.refunds"),
        ("billing.execute_refund", "billing.refunds"),
        ("billing.attach_card", "billing.default"),
        ("billing.cancel_subscription", "billing.default"),
        ("billing.open_due_invoices", "billing.scheduler"),
        ("billing.enqueue_due_invoices", "billing.scheduler"),
        ("billing.run_refunds", "billing.scheduler"),
        ("billing.reconcile", "billing.scheduler"),
        ("billing.relay_outbox", "billing.scheduler"),
    ],
)
def test_each_task_is_routed_to_its_queue(name: str, queue: str) -> None:
    route = app.amqp.router.route({}, name, (), {})
    assert route["queue"].name == queue
    assert route["queue"].routing_key == queue


def test_a_worker_without_q_consumes_all_four_queues() -> None:
    assert sorted(q.name for q in app.conf.task_queues) == sorted(config.QUEUE_NAMES)
    assert app.conf.task_default_queue == "billing.default"


def test_the_default_pool_is_threads_for_gateway_bound_work() -> None:
    conf = celery_config(TaskSettings.from_env({}))
    assert conf["worker_pool"] == "threads"
    assert conf["worker_concurrency"] == 32


def test_pool_and_concurrency_can_be_overridden_by_environment() -> None:
    conf = celery_config(TaskSettings.from_env({"BILLING_WORKER_POOL": "prefork", "BILLING_WORKER_CONCURRENCY": "4"}))
    assert (conf["worker_pool"], conf["worker_concurrency"]) == ("prefork", 4)


def test_the_embedded_broker_is_the_default_and_gets_no_redis_transport_options() -> None:
    conf = celery_config(TaskSettings.from_env({}))
    assert conf["broker_url"] == "sqla+sqlite:///celery-broker.db"
    # kombu's SQLAlchemy transport passes transport options to create_engine(), which rejects unknown ones.
    assert "broker_transport_options" not in conf


def test_redis_visibility_timeout_exceeds_the_hard_limit_which_exceeds_the_soft_limit() -> None:
    conf = celery_config(TaskSettings.from_env({"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}))
    visibility = conf["broker_transport_options"]["visibility_timeout"]
    assert (visibility, conf["task_time_limit"], conf["task_soft_time_limit"]) == (1800, 150, 120)
    assert visibility > conf["task_time_limit"] > conf["task_soft_time_limit"]
    assert visibility > TaskSettings().retry_backoff_max_seconds


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"BILLING_TASK_SOFT_TIME_LIMIT": "150", "BILLING_TASK_TIME_LIMIT": "150"}, "BILLING_TASK_TIME_LIMIT"),
        ({"BILLING_VISIBILITY_TIMEOUT": "100"}, "BILLING_VISIBILITY_TIMEOUT"),
        ({"BILLING_WORKER_POOL": "fork"}, "BILLING_WORKER_POOL"),
        ({"BILLING_WORKER_CONCURRENCY": "0"}, "BILLING_WORKER_CONCURRENCY"),
        ({"BILLING_BEAT_OPEN_SECONDS": "ten"}, "BILLING_BEAT_OPEN_SECONDS"),
    ],
)
def test_inconsistent_or_malformed_settings_are_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        TaskSettings.from_env(env)


def test_results_are_ignored_unless_a_result_backend_is_configured() -> None:
    assert celery_config(TaskSettings.from_env({}))["task_ignore_result"] is True
    conf = celery_config(TaskSettings.from_env({"CELERY_RESULT_BACKEND": "redis://127.0.0.1:6379/1"}))
    assert conf["task_ignore_result"] is False
    assert conf["result_backend"] == "redis://127.0.0.1:6379/1"


def test_beat_runs_every_periodic_task_on_the_scheduler_queue_at_configurable_intervals() -> None:
    schedule = celery_config(TaskSettings.from_env({"BILLING_BEAT_OPEN_SECONDS": "3"}))["beat_schedule"]
    assert set(schedule) == set(config.PERIODIC_TASKS)
    # Event delivery has its own queue: a slow receiver never delays the scheduler's work.
    queues = {name: entry["options"]["queue"] for name, entry in schedule.items()}
    assert queues.pop("billing.deliver_events") == "billing.events"
    assert set(queues.values()) == {"billing.scheduler"}
    assert {name: entry["schedule"] for name, entry in schedule.items()} == {
        "billing.open_due_invoices": 3.0,
        "billing.enqueue_due_invoices": 30.0,
        "billing.run_refunds": 30.0,
        "billing.reconcile": 60.0,
        "billing.relay_outbox": 15.0,
        "billing.deliver_events": 2.0,
    }


def test_task_input_errors_are_expected_and_never_retried() -> None:
    from tasks.errors import TaskInputError

    for name in config.ALL_TASKS:
        task = app.tasks[name]
        assert TaskInputError in task.throws
        assert not getattr(task, "autoretry_for", ())


def test_billing_tasks_and_only_they_use_the_masking_base_class() -> None:
    from tasks.base import BillingTask, MaskingRequest

    for name, task in app.tasks.items():
        assert isinstance(task, BillingTask) == name.startswith("billing."), name
    assert all(app.tasks[name].Request is MaskingRequest for name in config.ALL_TASKS)
