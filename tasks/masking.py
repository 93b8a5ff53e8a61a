"""Masked `argsrepr`/`kwargsrepr`: what worker logs, events and Flower show instead of the real arguments.

Celery shows a task's arguments through the message's `argsrepr`/`kwargsrepr` headers, which the SENDER
computes (`saferepr(kwargs)` unless told otherwise). A sender that does not know about secrets therefore puts
the token in those headers; `tasks.base.MaskingRequest` recomputes them on the worker from the real
arguments with `masked_reprs`, and our own senders (`tasks.client`, the publisher, retries) set them too.

Rule: a value is shown only when its argument name is one the task declares and is not secret; for a task
that has secret arguments, strings are hidden even under a declared name (a sender may have put the token in
the wrong field). Positional arguments are never accepted, and their strings are hidden.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from celery.utils.saferepr import saferepr

MASK = "***"
REPR_MAXLEN = 1024


def _shown(value: Any, hide_strings: bool) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return True
    if isinstance(value, list | tuple):  # a list of ids (billing.charge_invoices); anything else is hidden
        return all(isinstance(item, int) for item in value)
    return isinstance(value, str) and not hide_strings


def masked_kwargs(kwargs: Mapping[str, Any], known: Collection[str], secrets: Collection[str]) -> dict[str, Any]:
    """The kwargs with every value that might be a secret replaced by '***'."""
    hide_strings = bool(secrets)
    return {
        str(name): value if name in known and name not in secrets and _shown(value, hide_strings) else MASK
        for name, value in kwargs.items()
    }


def masked_args(args: Sequence[Any] | None, secrets: Collection[str]) -> tuple[Any, ...]:
    hide_strings = bool(secrets)
    return tuple(value if _shown(value, hide_strings) and not isinstance(value, str) else MASK for value in args or ())


def masked_reprs(
    args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, known: Collection[str], secrets: Collection[str]
) -> tuple[str, str]:
    """(argsrepr, kwargsrepr) safe for logs, events and Flower."""
    kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    args = args if isinstance(args, list | tuple) else ()
    return (
        saferepr(masked_args(args, secrets), REPR_MAXLEN),
        saferepr(masked_kwargs(kwargs, known, secrets), REPR_MAXLEN),
    )
