"""The billing pause: one switch that stops every charge when an answer says all of them would fail."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from billing.db import control
from billing.db.models import Control
from billing.gateway import errors as gw
from billing.services import events, stream
from billing.services.context import Context
from billing.services.operators import Actor


class PauseReason(StrEnum):
    UNAUTHORIZED = "unauthorized"  # Tpaga answered 401: the key is wrong or revoked
    MERCHANT_DECLINE = "merchant_decline"  # a merchant-class errorCode: the merchant account needs attention
    GATEWAY_UNREACHABLE = "gateway_unreachable"  # every call was not sent for minutes


def billing_paused(session: Session) -> dict[str, Any] | None:
    return control.get_pause(session)


def pause_billing(session: Session, now: datetime, reason: PauseReason, error_code: str | None) -> None:
    """Stop all charging until an operator (or the gateway probe) resumes it.

    Workers that see a 401 at the same moment all pause: the first one records the pause (and its event), the
    others do nothing. A failed insert here would roll back the caller's transaction, with every charge
    outcome it was recording (a whole batch's), and leave those attempts for the review queue.
    """
    payload = json.dumps({"reason": str(reason), "error_code": error_code, "since": now.isoformat()})
    if control.insert_if_absent(session, control.PAUSE_KEY, payload, now):
        events.record(session, now, "billing.paused", reason=str(reason), error_code=error_code)
        # About no subscription or customer: ordered by offset among such events.
        stream.emit(session, now, "billing.paused", reason=str(reason), error_code=error_code)


UNREACHABLE_KEY = "gateway_unreachable_since"


def note_not_sent(session: Session, now: datetime, pause_after: timedelta) -> None:
    """A call was provably not sent (connection refused, DNS, a wrong URL): after `pause_after` of nothing but
    such calls, billing pauses with an ALERT instead of rescheduling every invoice forever."""
    if control.insert_if_absent(session, UNREACHABLE_KEY, now.isoformat(), now):
        return
    raw = control.get_value(session, UNREACHABLE_KEY)
    if raw is not None and now - datetime.fromisoformat(raw) >= pause_after:
        pause_billing(session, now, PauseReason.GATEWAY_UNREACHABLE, None)


# A process clears the run at most this often: far inside the pause's five minutes, and one statement per
# batch saved on the hot path.
REACHED_EVERY_SECONDS = 10.0


def note_reached(ctx: Context, session: Session, *, force: bool = False) -> None:
    """Tpaga answered a call: the run of not-sent calls, if any, is over."""
    mono = time.monotonic()
    if not force and mono - ctx.reached_noted_at < REACHED_EVERY_SECONDS:
        return
    session.execute(delete(Control).where(Control.key == UNREACHABLE_KEY))
    ctx.reached_noted_at = mono


def resume_billing(ctx: Context, actor: Actor | None = None) -> bool:
    """Lift a pause; returns whether one was lifted. The `actor` (an operator) is recorded with it."""
    now = ctx.clock.now()
    with ctx.unit_of_work() as session:
        paused = control.get_pause(session)
        if paused is None:
            return False
        control.delete_value(session, control.PAUSE_KEY)
        note_reached(ctx, session, force=True)
        events.record(session, now, "billing.resumed")
        stream.emit(session, now, "billing.resumed", reason=paused.get("reason"), paused_since=paused.get("since"))
        if actor is not None:
            actor.record(session, now, "billing.resume", paused_for=paused.get("reason"))
        return True


def probe_gateway(ctx: Context) -> bool:
    """While billing is paused for bad credentials or an unreachable gateway, check with a harmless GET; resume
    when Tpaga answers it with our key."""
    with ctx.sessions() as session:
        pause = control.get_pause(session)
    if pause is None or pause.get("reason") not in (PauseReason.UNAUTHORIZED, PauseReason.GATEWAY_UNREACHABLE):
        return False
    try:
        ctx.gateway.get_charge("credential-probe")
    except gw.UnauthorizedError:
        return False
    except gw.NotFoundError:
        pass  # authenticated: the id simply does not exist
    except gw.TpagaError:
        return False
    return resume_billing(ctx)
