"""`tasks.client`'s command helpers, on the sending side: what lands in `send_task` (the worker side of each
command is tested through a real worker elsewhere; tests/test_tasks_import.py sends with these helpers too)."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from billing import task_names
from tasks import client
from tasks.config import KWARGS
from tests.test_tasks_masking import RecordingApp

TOKEN = "tok_SECRET_client_0123456789"
BOGOTA = timezone(timedelta(hours=-5))


def _sent(call: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    sender = RecordingApp()
    assert call(sender, **kwargs) == "t-1"
    ((name, options),) = sender.calls
    json.dumps(options["kwargs"])  # what the sender's Celery will serialize: JSON types only
    return name, options


def test_every_command_has_a_helper_taking_exactly_the_tasks_kwargs() -> None:
    assert set(client.COMMAND_HELPERS) == set(task_names.COMMANDS)
    for name, helper in client.COMMAND_HELPERS.items():
        params = list(inspect.signature(helper).parameters.values())
        assert params[0].name == "app"
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name
        assert sorted(p.name for p in params[1:]) == sorted(KWARGS[name]), name


def test_upsert_plan_sends_the_amount_as_a_decimal_string_to_the_default_queue() -> None:
    name, options = _sent(
        client.upsert_plan,
        code="gold",
        amount=Decimal("4.5E+4"),
        currency="COP",
        interval="month",
        request_id="plan-gold-1",
    )
    assert name == "billing.upsert_plan"
    assert options["queue"] == "billing.default"
    assert options["kwargs"] == {
        "code": "gold",
        "amount": "45000",
        "currency": "COP",
        "interval": "month",
        "interval_count": 1,
        "trial_days": 0,
        "request_id": "plan-gold-1",
    }
    assert options["kwargsrepr"].startswith("{'code': 'gold', 'amount': '45000'")


@pytest.mark.parametrize(("amount", "sent"), [("45000.00", "45000.00"), (45000, "45000"), (Decimal("9.99"), "9.99")])
def test_upsert_plan_accepts_exact_amounts(amount: Any, sent: str) -> None:
    _, options = _sent(client.upsert_plan, code="p", amount=amount, currency="USD", interval="week")
    assert options["kwargs"]["amount"] == sent


@pytest.mark.parametrize("amount", [45000.0, True, Decimal("NaN"), Decimal("Infinity"), None])
def test_upsert_plan_refuses_an_inexact_amount_before_sending(amount: Any) -> None:
    sender = RecordingApp()
    with pytest.raises(ValueError, match="amount must be"):
        client.upsert_plan(sender, code="p", amount=amount, currency="COP", interval="month")  # type: ignore[arg-type]
    assert sender.calls == []


def test_times_travel_as_iso_8601_with_their_offset() -> None:
    anchor = datetime(2026, 12, 1, 9, 0, tzinfo=BOGOTA)
    issued = datetime(2026, 11, 20, 14, 30, 5, 123456, tzinfo=UTC)
    _, options = _sent(
        client.create_subscription,
        external_id="sub_1",
        external_customer_id="cus_1",
        plan_code="gold",
        trial_days=0,
        anchor_at=anchor,
        issued_at=issued,
    )
    kwargs = options["kwargs"]
    assert kwargs["anchor_at"] == "2026-12-01T09:00:00-05:00"
    assert kwargs["issued_at"] == "2026-11-20T14:30:05.123456+00:00"
    assert datetime.fromisoformat(kwargs["anchor_at"]) == anchor
    # A string is the sender's own ISO 8601 text: sent as given.
    _, options = _sent(client.pause_subscription, external_subscription_id="sub_1", resumes_at="2027-01-01T00:00Z")
    assert options["kwargs"] == {"external_subscription_id": "sub_1", "resumes_at": "2027-01-01T00:00Z"}


@pytest.mark.parametrize("field", ["anchor_at", "issued_at"])
def test_a_datetime_without_a_time_zone_is_refused_before_sending(field: str) -> None:
    sender = RecordingApp()
    with pytest.raises(ValueError, match=f"{field} must be a datetime with a time zone"):
        client.create_subscription(
            sender,
            external_id="sub_1",
            external_customer_id="cus_1",
            plan_code="gold",
            **{field: datetime(2026, 12, 1, 9, 0)},  # type: ignore[arg-type]
        )
    assert sender.calls == []


def test_arguments_left_at_none_are_not_sent() -> None:
    _, options = _sent(
        client.upsert_customer, external_id="cus_1", email="ana@example.com", first_name="Ana", last_name="Gómez"
    )
    assert options["kwargs"] == {
        "external_id": "cus_1",
        "email": "ana@example.com",
        "first_name": "Ana",
        "last_name": "Gómez",
    }
    _, options = _sent(client.resume_subscription, external_subscription_id="sub_1")
    assert options["kwargs"] == {"external_subscription_id": "sub_1"}


def test_attach_card_masks_the_token_and_every_string_in_the_reprs() -> None:
    name, options = _sent(client.attach_card, token=TOKEN, external_customer_id="cus_1", request_id="card-1")
    assert name == "billing.attach_card" and options["queue"] == "billing.default"
    assert options["kwargs"] == {"token": TOKEN, "external_customer_id": "cus_1", "request_id": "card-1"}
    assert TOKEN not in options["kwargsrepr"] + options["argsrepr"]
    assert options["kwargsrepr"] == "{'token': '***', 'external_customer_id': '***', 'request_id': '***'}"
    _, options = _sent(client.attach_card, token=TOKEN, customer_id=7)
    assert options["kwargs"] == {"token": TOKEN, "customer_id": 7}
    assert options["kwargsrepr"] == "{'token': '***', 'customer_id': 7}"


@pytest.mark.parametrize(
    ("call", "kwargs", "message"),
    [
        (client.attach_card, {"token": TOKEN}, "exactly one of external_customer_id or customer_id"),
        (
            client.attach_card,
            {"token": TOKEN, "customer_id": 1, "external_customer_id": "cus_1"},
            "exactly one of external_customer_id or customer_id",
        ),
        (client.cancel_subscription, {}, "exactly one of external_subscription_id or subscription_id"),
        (
            client.cancel_subscription,
            {"subscription_id": 1, "external_subscription_id": "sub_1"},
            "exactly one of external_subscription_id or subscription_id",
        ),
    ],
)
def test_both_or_neither_of_two_alternative_ids_is_refused_before_sending(
    call: Any, kwargs: dict[str, Any], message: str
) -> None:
    sender = RecordingApp()
    with pytest.raises(ValueError, match=message):
        call(sender, **kwargs)
    assert sender.calls == []
    assert TOKEN not in message


def test_cancel_sends_its_flags_even_when_false() -> None:
    _, options = _sent(client.cancel_subscription, external_subscription_id="sub_1")
    assert options["kwargs"] == {
        "external_subscription_id": "sub_1",
        "at_period_end": False,
        "refund_last_charge": False,
    }
    _, options = _sent(client.cancel_subscription, subscription_id=3, at_period_end=True)
    assert options["kwargs"] == {"subscription_id": 3, "at_period_end": True, "refund_last_charge": False}


def test_send_passes_a_kwarg_called_name_to_the_task() -> None:
    sender = RecordingApp()
    client.send(sender, "billing.upsert_plan", code="p", name="Gold")  # type: ignore[arg-type]
    ((task, options),) = sender.calls
    assert task == "billing.upsert_plan" and options["kwargs"] == {"code": "p", "name": "Gold"}
    _, options = _sent(client.upsert_plan, code="p", amount="1000", currency="COP", interval="day", name="Gold")
    assert options["kwargs"]["name"] == "Gold"
