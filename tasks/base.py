"""The base of every task: strict keyword-argument validation, error mapping, retries, masked reprs.

A task is like a web view: parse the arguments (here, against the task function's own signature and type
hints), call one service, map the outcome. Bad input fails once with a precise `TaskInputError` (listed in
`throws`, never retried); a database blip retries with a short jittered countdown; SQLAlchemy and gateway
errors are replaced by exceptions whose messages carry no SQL parameters, tokens or card ids.
"""

from __future__ import annotations

import inspect
import logging
import random
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.worker.request import Request
from sqlalchemy.exc import DisconnectionError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from billing.services import ledger
from billing.services.errors import AnswerLost, InvalidRequest, NotFound, Waiting
from tasks.config import COMMANDS, MAX_CHARGE_BATCH, SECRET_KWARGS
from tasks.errors import DatabaseError, GatewayError, TaskInputError, TransientError
from tasks.masking import masked_reprs

log = logging.getLogger("billing.tasks")

MAX_ID = 2**63 - 1  # PostgreSQL bigint
RETRY_BASE_SECONDS = 2.0
TRANSIENT_DB_ERRORS = (OperationalError, DisconnectionError, PoolTimeoutError)


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    optional: bool  # may be None
    required: bool  # no default
    item: type | None = None  # for a list: the type of its items (only list[int], a list of ids, is supported)


def _describe(value: Any, secret: bool) -> str:
    """How a rejected value is named in an error: its type always, its value only when harmless.

    `secret` is true for every argument of a task that takes a secret: a sender may have put the token in
    the wrong field.
    """
    kind = type(value).__name__
    if secret or isinstance(value, list | dict):
        return f"a {kind}"
    if isinstance(value, str):
        return f"{value[:40]!r} (a str)"
    return f"{value!r} (a {kind})"


def _check_id(task_name: str, name: str, value: Any, secret: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskInputError(f"{task_name}: {name} must be an integer id, got {_describe(value, secret)}")
    if not 1 <= value <= MAX_ID:
        raise TaskInputError(f"{task_name}: {name} must be a positive integer id, got {value}")
    return value


def _check(task_name: str, param: Param, value: Any, secret: bool) -> Any:
    if value is None and param.optional:
        return None
    if param.kind is list and param.item is int:
        if not isinstance(value, list):
            raise TaskInputError(
                f"{task_name}: {param.name} must be a list of integer ids, got {_describe(value, secret)}"
            )
        if not 1 <= len(value) <= MAX_CHARGE_BATCH:
            raise TaskInputError(f"{task_name}: {param.name} must hold 1 to {MAX_CHARGE_BATCH} ids, got {len(value)}")
        return [_check_id(task_name, f"{param.name}[{n}]", item, secret) for n, item in enumerate(value)]
    if param.kind is int and param.name.endswith("_id"):
        return _check_id(task_name, param.name, value, secret)
    if param.kind is int:
        # A count (trial_days, interval_count), not an id: 0 is a valid value; the service checks the range.
        if isinstance(value, bool) or not isinstance(value, int):
            raise TaskInputError(f"{task_name}: {param.name} must be a whole number, got {_describe(value, secret)}")
        return value
    if param.kind is bool:
        if not isinstance(value, bool):
            raise TaskInputError(f"{task_name}: {param.name} must be true or false, got {_describe(value, secret)}")
        return value
    if param.kind is str:
        if not isinstance(value, str):
            raise TaskInputError(f"{task_name}: {param.name} must be a string, got {_describe(value, secret)}")
        return value
    raise TypeError(f"{task_name}: unsupported parameter type {param.kind!r}")  # a programming error


def task_params(fun: Callable[..., Any]) -> tuple[Param, ...]:
    """Keyword-only parameters and their JSON types (int ids, str, bool, or one of them | None)."""
    hints = typing.get_type_hints(fun)
    params = []
    for p in inspect.signature(fun).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"{fun.__qualname__}: task parameters must be keyword-only, {p.name} is not")
        hint = hints[p.name]
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
        optional = type(None) in members
        kind = next((m for m in members if m is not type(None)), hint) if members else hint
        item = None
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kind = list
        params.append(Param(p.name, kind, optional, p.default is inspect.Parameter.empty, item))
    return tuple(params)


class MaskingRequest(Request):  # type: ignore[misc]
    """A worker-side request whose argsrepr/kwargsrepr are recomputed from the real arguments with secrets
    masked, whatever the sender put in the headers; these feed the "received" log line, the task-received
    event (Flower), failure logs, and `inspect active/reserved/scheduled` (also masked here)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        task = self._task
        known = getattr(task, "param_names", ())
        secrets = SECRET_KWARGS.get(self._type, frozenset())
        argsrepr, kwargsrepr = masked_reprs(self._args, self._kwargs, known, secrets)
        self._argsrepr = argsrepr
        self._kwargsrepr = kwargsrepr
        # The task's own context (failure and retry log lines in celery.app.trace) reads these keys.
        self._request_dict["argsrepr"] = argsrepr
        self._request_dict["kwargsrepr"] = kwargsrepr

    def info(self, safe: bool = False) -> dict[str, Any]:
        # `inspect reserved` and `inspect scheduled` ask for unsafe info (raw arguments); never give it.
        return typing.cast(dict[str, Any], super().info(safe=True))


class BillingTask(Task):  # type: ignore[misc]
    """Validates keyword arguments against the task function's signature and maps errors (see module doc)."""

    Request = MaskingRequest
    throws = (TaskInputError,)
    max_retries = 8
    retry_backoff_max_seconds = 60
    _params: tuple[Param, ...] | None = None

    @property
    def params(self) -> tuple[Param, ...]:
        if self._params is None:
            type(self)._params = task_params(self.run)
        assert self._params is not None
        return self._params

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def secret_params(self) -> frozenset[str]:
        return SECRET_KWARGS.get(self.name, frozenset())

    def validate(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments checked against the signature, or TaskInputError naming exactly what is wrong."""
        names = self.param_names
        takes = ", ".join(names) if names else "no arguments"
        if args:
            raise TaskInputError(
                f"{self.name} takes keyword arguments only ({takes}); got {len(args)} positional argument(s)"
            )
        extra = sorted(str(k) for k in kwargs if k not in names)
        if extra:
            raise TaskInputError(f"{self.name}: unexpected argument(s) {', '.join(extra)}; it takes {takes}")
        missing = [p.name for p in self.params if p.required and p.name not in kwargs]
        if missing:
            raise TaskInputError(f"{self.name}: missing required argument(s) {', '.join(missing)}")
        return {
            p.name: _check(self.name, p, kwargs[p.name], bool(self.secret_params))
            for p in self.params
            if p.name in kwargs
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The worker's tracer has already pushed the request; do not push another one (Task.__call__ would).
        clean = self.validate(args, kwargs)
        transient: Exception | None = None
        failure: Exception | None = None
        waiting: Waiting | None = None
        try:
            result = self.run(**clean)
            if getattr(self.request, "retries", 0) and self.name in COMMANDS:
                from tasks.app import runtime

                ledger.stop_waiting(runtime.context(), str(self.request.id))
            return result
        except Waiting as exc:
            waiting = exc
        except AnswerLost as exc:
            failure = GatewayError(f"{self.name}: {exc}")
        except TaskInputError as exc:
            failure = TaskInputError(str(exc))
        except (NotFound, InvalidRequest) as exc:
            failure = TaskInputError(f"{self.name}: {exc}")
        except TransientError as exc:
            transient = exc
        except TRANSIENT_DB_ERRORS as exc:
            transient = TransientError(f"database unavailable ({_db_error_name(exc)})")
        except SQLAlchemyError as exc:
            failure = DatabaseError(f"{self.name}: database error ({_db_error_name(exc)})")
        # Raised outside the except blocks: no chained original (SQL parameters, tokens) in any traceback.
        if failure is not None:
            raise failure
        if waiting is not None:
            raise self.wait_for(waiting)
        assert transient is not None
        raise self.retry_soon(transient)

    def wait_for(self, waiting: Waiting) -> Exception:
        """The command names an object not there yet: retry it (the usual backoff, no retry limit) until it has
        waited BILLING_COMMAND_WAIT_SECONDS since its first delivery, then refuse it for good, recorded."""
        from tasks.app import runtime  # the app module imports this one

        ctx = runtime.context()
        task_id = str(self.request.id or "")
        window = runtime.task_settings.command_wait_seconds
        waited = (ctx.clock.now() - ledger.waiting_since(ctx, task_id)).total_seconds() if task_id else window
        if waited >= window:
            reason = f"{waiting} after waiting {int(waited)} s (BILLING_COMMAND_WAIT_SECONDS={window}); refused"
            if waiting.give_up is not None:
                waiting.give_up(reason)
            if task_id:
                ledger.stop_waiting(ctx, task_id)
            return TaskInputError(f"{self.name}: {reason}")
        retries = int(getattr(self.request, "retries", 0) or 0)
        step = min(float(self.retry_backoff_max_seconds), RETRY_BASE_SECONDS * 2.0**retries, window - waited + 1)
        countdown = step / 2 + random.random() * step / 2
        log.info("%s[%s]: %s; waiting, retry in %.1fs", self.name, self.request.id, waiting, countdown)
        return typing.cast(
            Exception, self.retry(exc=TransientError(str(waiting)), countdown=countdown, max_retries=None)
        )

    def retry_soon(self, exc: Exception) -> Exception:
        """Retry with a jittered exponential countdown capped at 60 s (far below the visibility timeout)."""
        retries = int(getattr(self.request, "retries", 0) or 0)
        step = min(float(self.retry_backoff_max_seconds), RETRY_BASE_SECONDS * 2.0**retries)
        countdown = step / 2 + random.random() * step / 2
        log.warning("%s[%s]: %s; retry %d in %.1fs", self.name, self.request.id, exc, retries + 1, countdown)
        return typing.cast(Exception, self.retry(exc=exc, countdown=countdown, max_retries=self.max_retries))

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Our own sends (including retries, which copy the original kwargs) carry masked reprs in the message
        # and in the task-sent event.
        argsrepr, kwargsrepr = masked_reprs(args, kwargs, self.param_names, self.secret_params)
        options["argsrepr"] = argsrepr
        options["kwargsrepr"] = kwargsrepr
        return super().apply_async(args, kwargs, **options)


def _db_error_name(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return f"{type(exc).__name__}/{type(orig).__name__}" if orig is not None else type(exc).__name__
