"""Argument validation and error mapping of the task base class, called in-process (no broker).

What a worker does with these errors (fail once, never retry) is proven with a real worker in
test_celery_contract.py; here the table of messages and the scrubbing of secrets are pinned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.exc import IntegrityError, OperationalError

import tasks
from billing.bootstrap import build_context
from billing.clock import TestClock
from billing.config import Settings
from billing.db import migrate
from billing.gateway import errors as gw
from billing.services import catalog
from billing.services.context import Context
from billing.services.errors import NotFound
from tasks.errors import DatabaseError, GatewayError, TaskInputError, TransientError

app = tasks.app
SECRET = "card_SECRET_8f14e45fceea167a"
MAX_ID = 2**63 - 1


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("billing.charge_invoice", {"invoice_id": "12"}, "invoice_id must be an integer id, got '12' (a str)"),
        ("billing.charge_invoice", {"invoice_id": 1.0}, "invoice_id must be an integer id, got 1.0 (a float)"),
        ("billing.charge_invoice", {"invoice_id": False}, "invoice_id must be an integer id, got False (a bool)"),
        ("billing.charge_invoice", {"invoice_id": None}, "invoice_id must be an integer id, got None (a NoneType)"),
        ("billing.charge_invoice", {"invoice_id": [1]}, "invoice_id must be an integer id, got a list"),
        ("billing.charge_invoice", {"invoice_id": 0}, "invoice_id must be a positive integer id, got 0"),
        ("billing.charge_invoice", {"invoice_id": -3}, "invoice_id must be a positive integer id, got -3"),
        ("billing.charge_invoice", {"invoice_id": MAX_ID + 1}, "must be a positive integer id"),
        ("billing.charge_invoice", {}, "missing required argument(s) invoice_id"),
        (
            "billing.charge_invoice",
            {"invoice_id": 1, "a": 1, "b": 2},
            "unexpected argument(s) a, b; it takes invoice_id",
        ),
        ("billing.request_refund", {"invoice_id": 1}, "missing required argument(s) reason"),
        ("billing.request_refund", {"invoice_id": 1, "reason": 5}, "reason must be a string, got 5 (a int)"),
        (
            "billing.cancel_subscription",
            {"subscription_id": 1, "refund_last_charge": 1},
            "refund_last_charge must be true or false",
        ),
        ("billing.attach_card", {"customer_id": 1}, "missing required argument(s) token"),
        ("billing.attach_card", {"customer_id": 1, "token": 123}, "token must be a string, got a int"),
        ("billing.attach_card", {"customer_id": SECRET, "token": "t"}, "customer_id must be an integer id, got a str"),
        ("billing.open_due_invoices", {"limit": 5}, "unexpected argument(s) limit; it takes no arguments"),
    ],
)
def test_bad_arguments_are_refused_with_a_precise_message(name: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TaskInputError) as caught:
        app.tasks[name].validate((), kwargs)
    assert message in str(caught.value)
    assert str(caught.value).startswith(name)
    assert SECRET not in str(caught.value)


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(TaskInputError, match=r"takes keyword arguments only \(invoice_id\); got 2 positional"):
        app.tasks["billing.charge_invoice"].validate((1, 2), {})


def test_optional_arguments_may_be_omitted_or_null() -> None:
    task = app.tasks["billing.request_refund"]
    assert task.validate((), {"reason": "r", "charge_id": None, "invoice_id": 4}) == {
        "reason": "r",
        "charge_id": None,
        "invoice_id": 4,
    }


def test_counts_are_whole_numbers_and_zero_is_one_of_them() -> None:
    # "No trial" is trial_days=0, the documented default: a count, not an id that must be positive.
    plan = {"code": "gold", "amount": "45000", "currency": "COP", "interval": "month"}
    assert app.tasks["billing.upsert_plan"].validate((), {**plan, "trial_days": 0})["trial_days"] == 0
    subscription = {"external_id": "sub_1", "external_customer_id": "cus_1", "plan_code": "gold"}
    assert app.tasks["billing.create_subscription"].validate((), {**subscription, "trial_days": 0})["trial_days"] == 0
    for value, shown in (("7", "'7' (a str)"), (True, "True (a bool)"), (1.5, "1.5 (a float)")):
        with pytest.raises(TaskInputError, match=re.escape(f"trial_days must be a whole number, got {shown}")):
            app.tasks["billing.create_subscription"].validate((), {**subscription, "trial_days": value})


# --- error mapping: a scratch app with the same base class ---------------------------------------------------

scratch = Celery("scratch", task_cls="tasks.base:BillingTask", broker="memory://")


def _sql_error(kind: type[Any]) -> Any:
    return kind("UPDATE cards SET tpaga_card_id=%(c)s", {"c": SECRET}, Exception("server closed the connection"))


@scratch.task(name="scratch.database_down")
def database_down(*, invoice_id: int) -> None:
    raise _sql_error(OperationalError)


@scratch.task(name="scratch.constraint")
def constraint(*, invoice_id: int) -> None:
    raise _sql_error(IntegrityError)


@scratch.task(name="scratch.not_found")
def not_found(*, invoice_id: int) -> None:
    raise NotFound(f"invoice {invoice_id} does not exist")


def _no_chain(exc: BaseException) -> None:
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_a_database_blip_becomes_a_retryable_error_without_sql_parameters() -> None:
    with pytest.raises(TransientError) as caught:
        database_down(invoice_id=1)  # called directly, retry() re-raises the error it was given
    assert str(caught.value) == "database unavailable (OperationalError/Exception)"
    _no_chain(caught.value)


def test_other_database_errors_fail_without_sql_parameters() -> None:
    with pytest.raises(DatabaseError) as caught:
        constraint(invoice_id=1)
    assert SECRET not in str(caught.value)
    assert "IntegrityError" in str(caught.value)
    _no_chain(caught.value)


def test_unknown_ids_from_the_services_become_task_input_errors() -> None:
    with pytest.raises(TaskInputError, match=r"^scratch.not_found: invoice 4 does not exist$") as caught:
        not_found(invoice_id=4)
    _no_chain(caught.value)


# --- attach_card against a gateway that fails in each way -------------------------------------------------


class FailingGateway:
    """A fake gateway whose associate_card raises the configured error."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def create_customer(self, **fields: Any) -> Any:
        return SimpleNamespace(id="cus_1")

    def associate_card(self, customer_id: str, temp_token: str) -> Any:
        assert self.error is not None
        raise self.error

    def charge(self, **kwargs: Any) -> Any:
        raise AssertionError("not used")

    def get_charge(self, charge_id: str) -> Any:
        raise AssertionError("not used")

    def refund(self, charge_id: str) -> Any:
        raise AssertionError("not used")


@pytest.fixture
def failing(sqlite_url: str) -> Iterator[tuple[FailingGateway, int]]:
    migrate.upgrade(sqlite_url)
    gateway = FailingGateway()
    ctx: Context = build_context(Settings(database_url=sqlite_url), gateway=gateway, clock=TestClock())
    customer = catalog.create_customer(ctx, email="x@example.com")
    tasks.runtime.use_factory(lambda: ctx)
    yield gateway, customer
    tasks.runtime.use_factory(None)
    ctx.sessions.kw["bind"].dispose()


@pytest.mark.parametrize(
    ("error", "raised", "message"),
    [
        (
            gw.ValidationError(f"associate_card: HTTP 422 {SECRET}"),
            TaskInputError,
            "Tpaga refused the token (HTTP 422)",
        ),
        (gw.NotFoundError("associate_card: HTTP 404", http_status=404), TaskInputError, "(HTTP 404)"),
        (gw.NotSentError("connection refused"), TransientError, "Tpaga was not reached"),
        (gw.OutcomeUnknownError("x", reason="timeout"), GatewayError, "the card may be associated there"),
        (gw.UnauthorizedError("401", http_status=401), GatewayError, "UnauthorizedError, HTTP 401"),
        (ValueError("temp_token must be a non-empty id"), TaskInputError, "token is malformed"),
    ],
)
def test_attach_card_maps_gateway_errors_without_the_token(
    failing: tuple[FailingGateway, int], error: Exception, raised: type[Exception], message: str
) -> None:
    gateway, customer = failing
    gateway.error = error
    with pytest.raises(raised) as caught:
        app.tasks["billing.attach_card"](customer_id=customer, token=SECRET)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)
    _no_chain(caught.value)


def test_attach_card_on_a_worker_without_its_private_key_says_so_not_that_the_token_is_malformed(
    sqlite_url: str,
) -> None:
    from billing.config import ConfigError

    migrate.upgrade(sqlite_url)
    # The worker's context as the environment builds it, with TPAGA_PRIVATE_KEY unset
    tasks.runtime.use_factory(lambda: build_context(Settings(database_url=sqlite_url)))
    try:
        with pytest.raises(ConfigError, match="TPAGA_PRIVATE_KEY is not set"):
            app.tasks["billing.attach_card"](customer_id=1, token=SECRET)
    finally:
        tasks.runtime.use_factory(None)
