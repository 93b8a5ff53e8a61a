"""Monitors (Flower, `celery events`) keep a task's arguments from our worker's masked task-received event,
never from the sender's task-sent event (which a careless sender fills with the token)."""

from __future__ import annotations

import pytest
from celery.events.state import State

from tasks import monitor
from tasks.monitor import without_client_arguments

TOKEN = "tok_secret_0123456789abcdef"


@pytest.fixture(autouse=True)
def _configured_process() -> None:
    # Part of what a worker, beat or Flower does when it starts (tasks.configure_process); importing does not.
    monitor.install()


def _event(kind: str, clock: int, **fields: object) -> dict[str, object]:
    return {
        "type": f"task-{kind}",
        "uuid": "t-1",
        "hostname": "sender@host" if kind == "sent" else "worker@host",
        "timestamp": 1000.0 + clock,
        "local_received": 1000.0 + clock,
        "clock": clock,
        **fields,
    }


def test_a_task_only_ever_sent_shows_no_arguments() -> None:
    state = State()
    state.event(_event("sent", 1, name="billing.attach_crd", args="()", kwargs=f"{{'token': '{TOKEN}'}}"))
    task = state.tasks["t-1"]
    assert task.name == "billing.attach_crd"
    assert task.kwargs is None and task.args is None
    assert TOKEN not in repr(task.as_dict())


def test_the_workers_masked_arguments_win_in_any_order() -> None:
    for order in (("sent", "received"), ("received", "sent")):
        state = State()
        for clock, kind in enumerate(order, start=1):
            kwargs = f"{{'token': '{TOKEN}'}}" if kind == "sent" else "{'customer_id': 7, 'token': '***'}"
            state.event(_event(kind, clock, name="billing.attach_card", args="()", kwargs=kwargs))
        assert state.tasks["t-1"].kwargs == "{'customer_id': 7, 'token': '***'}", order


def test_only_client_events_lose_their_arguments() -> None:
    fields = {"args": "()", "kwargs": "{}", "name": "n"}
    assert without_client_arguments("received", fields) is fields
    assert without_client_arguments("sent", fields) == {"name": "n"}
    assert without_client_arguments("sent", None) is None
