"""Secrets in task arguments: masked on the worker whatever the sender did, and on every send of ours."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery.contrib.testing.mocks import TaskMessage
from celery.events import get_exchange
from kombu import Queue

import tasks
from tasks.base import MaskingRequest
from tasks.client import send, send_attach_card
from tasks.errors import TransientError
from tasks.logs import install as install_log_masking
from tasks.logs import mask_tokens
from tasks.masking import masked_reprs

app = tasks.app
TOKEN = "tok_SECRET_d41d8cd98f00b204"


@pytest.mark.parametrize(
    ("args", "kwargs", "known", "secrets", "expected"),
    [
        (
            (),
            {"customer_id": 3, "token": TOKEN},
            ("customer_id", "token"),
            {"token"},
            ("()", "{'customer_id': 3, 'token': '***'}"),
        ),
        (
            (),
            {"customer_id": TOKEN, "token": 5},
            ("customer_id", "token"),
            {"token"},
            ("()", "{'customer_id': '***', 'token': '***'}"),
        ),
        ((), {"tokn": TOKEN}, ("customer_id", "token"), {"token"}, ("()", "{'tokn': '***'}")),
        ((3, TOKEN), {}, ("customer_id", "token"), {"token"}, ("(3, '***')", "{}")),
        ((), {"invoice_id": "12"}, ("invoice_id",), set(), ("()", "{'invoice_id': '12'}")),
        (
            (),
            {"reason": "asked", "invoice_id": 4},
            ("reason", "invoice_id"),
            set(),
            ("()", "{'reason': 'asked', 'invoice_id': 4}"),
        ),
        ((), {"invoice_id": 4, "card": "c_123"}, ("invoice_id",), set(), ("()", "{'invoice_id': 4, 'card': '***'}")),
    ],
)
def test_masked_reprs_show_only_declared_harmless_values(
    args: tuple[Any, ...], kwargs: dict[str, Any], known: tuple[str, ...], secrets: set[str], expected: tuple[str, str]
) -> None:
    assert masked_reprs(args, kwargs, known, secrets) == expected


def _request(kwargs: dict[str, Any], **headers: Any) -> MaskingRequest:
    message = TaskMessage("billing.attach_card", kwargs=kwargs, **headers)
    return MaskingRequest(message, app=app, task=app.tasks["billing.attach_card"])


def test_the_worker_masks_a_token_the_sender_put_in_kwargsrepr() -> None:
    kwargs = {"customer_id": 7, "token": TOKEN}
    request = _request(kwargs, argsrepr="()", kwargsrepr=repr(kwargs))  # a careless sender's headers
    assert request.kwargsrepr == "{'customer_id': 7, 'token': '***'}"
    assert request.argsrepr == "()"
    # The task context (failure and retry log lines) and repr() read the same values.
    assert request.request_dict["kwargsrepr"] == "{'customer_id': 7, 'token': '***'}"
    assert TOKEN not in repr(request)
    # The real arguments still reach the task.
    assert request.kwargs == kwargs


def test_inspect_reserved_and_scheduled_never_see_raw_arguments() -> None:
    request = _request({"customer_id": 7, "token": TOKEN})
    for info in (request.info(), request.info(safe=False), request.info(safe=True)):
        assert TOKEN not in repr(info)
        assert info["kwargs"] == "{'customer_id': 7, 'token': '***'}"


@pytest.fixture
def memory_connection() -> Any:
    with app.connection_for_write("memory://") as connection:
        events = Queue("events", get_exchange(connection, name=app.conf.event_exchange), routing_key="task.#")
        events(connection.default_channel).declare()
        yield connection


def _sent(connection: Any, queue: str) -> tuple[Any, Any]:
    message = connection.SimpleQueue(queue).get(timeout=1)
    event = connection.SimpleQueue("events").get(timeout=1)
    return message, event.payload


def test_our_sends_carry_masked_reprs_in_the_message_and_the_task_sent_event(memory_connection: Any) -> None:
    app.tasks["billing.attach_card"].apply_async(
        kwargs={"customer_id": 3, "token": TOKEN}, connection=memory_connection
    )
    message, event = _sent(memory_connection, "billing.default")
    assert message.headers["kwargsrepr"] == "{'customer_id': 3, 'token': '***'}"
    assert event["type"] == "task-sent"
    assert TOKEN not in repr(event)
    assert message.payload[1] == {"customer_id": 3, "token": TOKEN}


def test_a_retry_copies_the_arguments_but_not_the_token_into_the_reprs(memory_connection: Any) -> None:
    task = app.tasks["billing.attach_card"]
    task.push_request(
        id="retry-me",
        args=(),
        kwargs={"customer_id": 3, "token": TOKEN},
        called_directly=False,
        retries=0,
        delivery_info={"exchange": "", "routing_key": "billing.default"},
    )
    try:
        task.retry(exc=TransientError("gateway not reached"), countdown=1, throw=False, connection=memory_connection)
    finally:
        task.pop_request()
    message, event = _sent(memory_connection, "billing.default")
    assert message.headers["retries"] == 1
    assert message.headers["kwargsrepr"] == "{'customer_id': 3, 'token': '***'}"
    assert TOKEN not in repr(event)


class RecordingApp:
    """Stands in for another app's Celery instance: records what send_task is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> Any:
        self.calls.append((name, options))
        return type("Result", (), {"id": "t-1"})()


def test_send_attach_card_routes_and_masks_on_the_sending_side() -> None:
    sender = RecordingApp()
    assert send_attach_card(sender, 9, TOKEN) == "t-1"  # type: ignore[arg-type]
    ((name, options),) = sender.calls
    assert name == "billing.attach_card"
    assert options["queue"] == "billing.default"
    assert options["kwargs"] == {"customer_id": 9, "token": TOKEN}
    assert options["kwargsrepr"] == "{'customer_id': 9, 'token': '***'}"
    assert options["argsrepr"] == "()"


def test_send_uses_each_tasks_queue() -> None:
    sender = RecordingApp()
    send(sender, "billing.charge_invoice", invoice_id=5)  # type: ignore[arg-type]
    send(sender, "billing.request_refund", invoice_id=5, reason="asked")  # type: ignore[arg-type]
    assert [options["queue"] for _, options in sender.calls] == ["billing.charges", "billing.refunds"]
    assert sender.calls[0][1]["kwargsrepr"] == "{'invoice_id': 5}"


@pytest.fixture
def log_masking() -> Iterator[None]:
    """What a worker, beat or Flower does when it starts (tasks.configure_process), undone afterwards: the other
    tests of this process check their own code's masking."""
    factory = logging.getLogRecordFactory()
    install_log_masking()
    yield
    logging.setLogRecordFactory(factory)


@pytest.mark.usefixtures("log_masking")
def test_the_consumer_logs_a_misspelled_tasks_message_without_its_arguments(caplog: pytest.LogCaptureFixture) -> None:
    from celery.worker.consumer import consumer

    from tasks.logs import HIDDEN_BODY

    headers = {"task": "billing.attach_crd", "id": "x1", "kwargsrepr": f"{{'token': '{TOKEN}'}}"}
    with caplog.at_level("ERROR", logger=consumer.logger.name):
        consumer.logger.error(
            consumer.UNKNOWN_TASK_ERROR,
            KeyError("billing.attach_crd"),
            f"[[], {{'token': '{TOKEN}'}}, {{}}] (90b)",
            headers,
            {"routing_key": "billing.default"},
        )
        consumer.logger.error(consumer.INVALID_TASK_ERROR, ValueError("bad"), f"{{'token': '{TOKEN}'}}")
    text = caplog.text
    assert TOKEN not in text
    assert "billing.attach_crd" in text
    assert text.count(HIDDEN_BODY) == 2


@pytest.mark.usefixtures("log_masking")
def test_no_log_record_from_any_logger_carries_a_token_after_the_process_is_configured() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    parent = logging.getLogger("some.library")
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    try:
        child = logging.getLogger("some.library.child")  # a record that propagates to the parent's handler
        child.debug("body %r", f'[[], {{"customer_id": 1, "token": "{TOKEN}"}}, {{}}]'.encode())
        child.info("kwargs %s", {"token": TOKEN, "customer_id": 1})
        child.warning("form temp_token=%s&x=1", TOKEN)
        child.info("cut short: %s", f'{{"token": "{TOKEN[:10]}')
        try:
            raise KeyError(f"{{'token': '{TOKEN}'}}")
        except KeyError:
            child.exception("failed")
        child.debug(  # the pool's line, from whatever logger
            "TaskPool: Apply %s (args:%s kwargs:%s)",
            "<function fast_trace_task>",
            f"('billing.attach_card', 'id-1', {{}}, b'[[1, \"{TOKEN}\"], {{}}, {{}}]', 'application/json')",
            "{}",
        )
    finally:
        parent.removeHandler(handler)
    text = stream.getvalue()
    assert TOKEN not in text and TOKEN[:10] not in text
    assert '"token": "***"' in text and "'token': '***'" in text and "temp_token=***&x=1" in text
    assert "KeyError: \"{'token': '***'}\"" in text
    assert "TaskPool: Apply <function fast_trace_task> (args:['billing.attach_card', 'id-1', <hidden" in text
    assert mask_tokens("the token is malformed") == "the token is malformed"  # no value under a key: kept
