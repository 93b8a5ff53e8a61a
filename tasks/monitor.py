"""Task events as monitors keep them (Flower, `celery events`): a task's arguments come from our worker only.

A task's arguments reach a monitor in two events. `task-sent` is emitted by the SENDER, with the sender's own
argsrepr/kwargsrepr: an app that sends `billing.attach_card` without setting kwargsrepr puts the temporary
token there. `task-received` is emitted by our worker, with reprs recomputed from the real arguments and
secrets masked (tasks.base.MaskingRequest). When a message never reaches a billing worker (a misspelled task
name, a forgotten `queue=`), only the sender's version exists and Flower would show the token for as long as
it keeps the task; an out-of-order `task-sent` would even overwrite the worker's masked version.

`install()` makes Celery's event State (which Flower's builds on) ignore the arguments of client events: a
monitor shows the worker's masked arguments, or none.
"""

from __future__ import annotations

from typing import Any

from celery.events import state as event_state

CLIENT_EVENT = "sent"
CLIENT_ARGUMENT_FIELDS = frozenset({"args", "kwargs"})
_INSTALLED = "_billing_ignores_client_arguments"


def without_client_arguments(type_: str, fields: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields a monitor may keep from one task event."""
    if type_ != CLIENT_EVENT or not fields:
        return fields
    return {key: value for key, value in fields.items() if key not in CLIENT_ARGUMENT_FIELDS}


def install() -> None:
    """Wrap `celery.events.state.Task.event` once per process (idempotent)."""
    task_state = event_state.Task
    original = task_state.event
    if getattr(original, _INSTALLED, False):
        return

    def event(
        self: Any,
        type_: str,
        timestamp: Any = None,
        local_received: Any = None,
        fields: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        return original(
            self, type_, timestamp, local_received, without_client_arguments(type_, fields), *args, **kwargs
        )

    setattr(event, _INSTALLED, True)
    task_state.event = event
