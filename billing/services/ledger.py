"""The command ledger: what became of each command another app sent, keyed by its `request_id`.

A command's outcome (applied, rejected, stale) is written in the transaction of the change it made (or, for a
refusal, in one of its own, since nothing else changed), together with a hash of its parameters. A repeat of a
`request_id` returns the first outcome: the stored result, or the same refusal; a repeat with other parameters
is refused. Commands without a `request_id` are recorded too (with a null one) for the audit and the event
stream, and are idempotent by their external ids alone.

Each object a command changes keeps the newest `issued_at` applied to it (`last_issued_at`): a command issued
before that is stale, refused, and changes nothing. A command without `issued_at` is never stale and does not
move the mark.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.db import bulk
from billing.db.models import Command, CommandWait
from billing.services import events, stream
from billing.services.context import Context
from billing.services.errors import AnswerLost, InvalidRequest, ServiceError, Stale, Waiting

EXTERNAL_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
MAX_REQUEST_ID = 128

APPLIED = "applied"
REJECTED = "rejected"
STALE = "stale"
# Result keys the event stream leaves out (an app never gets a card id).
STREAM_HIDDEN = frozenset({"card_id"})


def check_external_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not EXTERNAL_ID.match(value):
        shown = f"{value[:70]!r} ({len(value)} characters)" if isinstance(value, str) else type(value).__name__
        raise InvalidRequest(f"{name} must be 1-64 characters of letters, digits and . _ : @ -; got {shown}")
    return value


@dataclass(frozen=True)
class Meta:
    """What every command may carry besides its parameters."""

    request_id: str | None = None
    issued_at: datetime | None = None
    # Sees the session, the time and the result of an applied command before it commits: the CLI records the
    # operator who ran it (an operator.action event) in the transaction of the change.
    on_applied: Callable[[Session, datetime, dict[str, Any]], None] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.request_id is not None and (
            not isinstance(self.request_id, str) or not 1 <= len(self.request_id) <= MAX_REQUEST_ID
        ):
            raise InvalidRequest(f"request_id must be a string of 1 to {MAX_REQUEST_ID} characters")
        if self.issued_at is not None and (not isinstance(self.issued_at, datetime) or self.issued_at.tzinfo is None):
            raise InvalidRequest("issued_at must be an ISO 8601 time with a UTC offset")


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def params_digest(name: str, params: dict[str, Any]) -> str:
    """SHA-256 of the command's name and parameters (issued_at and request_id are not parameters: a sender that
    re-sends one request with a fresh issued_at sends the same command)."""
    body = json.dumps({"command": name, **{k: _canonical(v) for k, v in params.items()}}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Scope:
    """One command being applied: its name, parameter hash and meta; writes its outcome."""

    name: str
    digest: str
    meta: Meta

    @classmethod
    def of(cls, name: str, params: dict[str, Any], meta: Meta) -> Scope:
        return cls(name, params_digest(name, params), meta)

    def prior(self, ctx: Context) -> dict[str, Any] | None:
        """The first outcome of this request_id: its result, or its refusal raised again; None if it is new."""
        if self.meta.request_id is None:
            return None
        with ctx.sessions() as session:
            row = session.execute(
                select(Command).where(Command.request_id == self.meta.request_id)
            ).scalar_one_or_none()
            if row is None:
                return None
            if row.name == self.name and row.params_sha256 == self.digest:
                if row.status == APPLIED:
                    return {**row.result, "repeat": True}
                error = row.error or "refused"
                raise Stale(error) if row.status == STALE else InvalidRequest(error)
            reused = InvalidRequest(
                f"request_id {self.meta.request_id!r} was already used by a {row.name} with other parameters"
            )
        self._reused(ctx, reused)
        raise reused

    def check_fresh(self, kind: str, external_id: str | None, last_issued_at: datetime | None) -> None:
        issued = self.meta.issued_at
        if issued is not None and last_issued_at is not None and issued < last_issued_at:
            raise Stale(
                f"stale: issued at {issued.isoformat()}, before the last change applied to {kind} "
                f"{external_id!r} ({last_issued_at.isoformat()}); nothing was changed"
            )

    def advance(self, last_issued_at: datetime | None) -> datetime | None:
        """The object's new mark: the newer of its own and this command's issued_at."""
        issued = self.meta.issued_at
        if issued is None:
            return last_issued_at
        return issued if last_issued_at is None or issued > last_issued_at else last_issued_at

    def applied(self, session: Session, now: datetime, result: dict[str, Any]) -> dict[str, Any]:
        """Record the outcome in the caller's transaction (the one that made the change); returns `result`."""
        self._write(session, now, APPLIED, result, None)
        if self.meta.on_applied is not None:
            self.meta.on_applied(session, now, result)
        return result

    def refused(self, ctx: Context, error: Exception) -> None:
        """Record a refusal in a transaction of its own; a concurrent duplicate that recorded first wins."""
        status = STALE if isinstance(error, Stale) else REJECTED
        now = ctx.clock.now()  # outside the transaction: a shared test clock reads the database
        try:
            with ctx.unit_of_work() as session:
                self._write(session, now, status, {}, str(error))
        except IntegrityError:  # a concurrent duplicate recorded its outcome first; that one stands
            pass

    def _reused(self, ctx: Context, error: InvalidRequest) -> None:
        """Record the refusal of a request_id reused with other parameters: as an event only, since the ledger's
        row for that request_id is (and stays) the first command's."""
        now = ctx.clock.now()  # outside the transaction: a shared test clock reads the database
        with ctx.unit_of_work() as session:
            events.record(
                session,
                now,
                "command.rejected",
                command=self.name,
                request_id=self.meta.request_id,
                status=REJECTED,
                reason=str(error),
            )

    def _write(self, session: Session, now: datetime, status: str, result: dict[str, Any], error: str | None) -> None:
        session.add(
            Command(
                request_id=self.meta.request_id,
                name=self.name,
                params_sha256=self.digest,
                status=status,
                result=result,
                error=error,
                issued_at=self.meta.issued_at,
                recorded_at=now,
            )
        )
        session.flush()
        kind = "command.applied" if status == APPLIED else "command.rejected"
        data: dict[str, Any] = {"command": self.name, "request_id": self.meta.request_id, "status": status}
        if error is not None:
            data["reason"] = error
        else:
            data["result"] = result
        ids = {k: result[k] for k in ("subscription_id", "invoice_id") if isinstance(result.get(k), int)}
        events.record(session, now, kind, **ids, **data)
        # The stream's copy is how a sender learns the outcome of a fire-and-forget command: in the order of
        # the subscription (or customer) it changed, never with a card id.
        owner = {k: result[k] for k in ("subscription_id", "customer_id") if isinstance(result.get(k), int)}
        stream.emit(
            session,
            now,
            kind,
            **owner,
            command=self.name,
            request_id=self.meta.request_id,
            status=status,
            result={k: v for k, v in result.items() if k not in STREAM_HIDDEN} if error is None else None,
            reason=error,
        )


def run(ctx: Context, scope: Scope, apply: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Apply a command once: the first outcome of a repeated request_id, else `apply()` with its refusal
    recorded. `apply` is idempotent by the objects' unique external ids; when a concurrent duplicate committed
    the same object (or request_id) between our read and our write, the IntegrityError rolled our transaction
    back and the command is looked at again, now finding what the other one made."""
    for attempt in range(3):
        prior = scope.prior(ctx)
        if prior is not None:
            return prior
        try:
            return apply()
        except IntegrityError:
            if attempt == 2:
                raise
        except Waiting as exc:
            exc.give_up = lambda reason: scope.refused(ctx, InvalidRequest(reason))
            raise
        except AnswerLost:
            raise
        except ServiceError as exc:
            scope.refused(ctx, exc)
            raise
    raise AssertionError("unreachable")


def waiting_since(ctx: Context, task_id: str) -> datetime:
    """When the command delivered as `task_id` first had to wait (now, the first time it is asked)."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        bulk.insert_rows(
            session,
            CommandWait,
            [{"task_id": task_id, "first_seen_at": now}],
            on_conflict_do_nothing=True,
            conflict_columns=("task_id",),
        )
        return session.execute(select(CommandWait.first_seen_at).where(CommandWait.task_id == task_id)).scalar_one()


def stop_waiting(ctx: Context, task_id: str) -> None:
    with ctx.unit_of_work() as session:
        session.execute(delete(CommandWait).where(CommandWait.task_id == task_id))
