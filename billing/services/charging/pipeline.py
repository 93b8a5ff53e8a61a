"""Charging invoices, top to bottom: claim, mark sending, call Tpaga between two commits, record.

The single-invoice task is a batch of one. A batch takes its share of the process's gateway slots
(BILLING_GATEWAY_CONCURRENCY) BEFORE claiming, so that what a crash leaves `sending` is what really was in
flight, then marks, sends and records in waves of the slots it holds (one wave, unless the pool was short).
Crash semantics: attempts are claimed `pending` (a worker lost before marking them `sending` leaves attempts
that reconciliation turns `not_sent` and reschedules); after `sending`, a lost worker's lease expires and
reconciliation flags them `unknown` for review. After an answer that pauses billing (401, merchant-class
decline) the batch sends nothing more: every other request would meet the same answer.

The partial unique indexes on charge_attempts make "two approved attempts" and "two attempts in flight" for
one invoice impossible in the database, whatever the broker delivers twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from billing.domain.declines import DeclineClass
from billing.gateway import errors as gw
from billing.gateway.pool import DEFAULT_GATEWAY_CONCURRENCY, GatewayPool
from billing.services.charging.attempts import CallResult, ChargeOutcome, Claim, HeldBack, Outcome
from billing.services.charging.claims import claim_invoices, mark_sending
from billing.services.charging.outcomes import record_outcomes
from billing.services.context import Context
from billing.services.errors import NotFound
from billing.services.pause import PauseReason


def charge_invoice(ctx: Context, invoice_id: int, *, pool: GatewayPool | None = None) -> ChargeOutcome:
    """Charge one open invoice if it is due now; idempotent under duplicate delivery and concurrency. Without a
    pool the call is made on the caller's thread (`billing tick`, scripts)."""
    outcome = charge_invoices(ctx, [invoice_id], pool=pool, inline=pool is None)[0]
    if outcome.outcome == Outcome.NOT_FOUND:
        raise NotFound(f"invoice {invoice_id} does not exist")
    return outcome


def charge_invoices(
    ctx: Context, invoice_ids: Sequence[int], *, pool: GatewayPool | None = None, inline: bool = False
) -> list[ChargeOutcome]:
    """Charge every invoice of the batch that is due now; one outcome per distinct id, in the given order.

    An id that is not claimable now (paid, in review, not due, claimed by a concurrent batch, unknown) gets the
    reason instead, and nothing is sent for it. The calls are concurrent on `pool` (a pool of the batch's own
    when None), or made one after the other on the caller's thread with `inline`.
    """
    ids = list(dict.fromkeys(invoice_ids))
    if not ids:
        return []
    if inline:
        claims, outcomes = claim_invoices(ctx, ids)
        done = _send_in_waves(ctx, _inline_runner(ctx), claims, max(1, len(claims)), lambda _: None)
    else:
        own = pool is None
        gateway_pool = GatewayPool(min(len(ids), DEFAULT_GATEWAY_CONCURRENCY)) if pool is None else pool
        try:
            with gateway_pool.slots(len(ids)) as held:
                claims, outcomes = claim_invoices(ctx, ids)
                width = max(1, min(held[0], len(claims)))

                def release(count: int) -> None:
                    count = min(count, held[0])
                    gateway_pool.release(count)
                    held[0] -= count

                release(held[0] - width)
                done = _send_in_waves(ctx, _pool_runner(ctx, gateway_pool), claims, width, release)
        finally:
            if own:
                gateway_pool.shutdown()
    for outcome in done:
        outcomes[outcome.invoice_id] = outcome
    return [outcomes[i] for i in ids]


class _Stop:
    """Set by the first answer of a batch that pauses billing: the batch sends nothing more."""

    reason: PauseReason | None = None


# Sends a wave's calls and yields their answers in groups, as they arrive.
Runner = Callable[[Sequence[Claim], "_Stop"], Iterator[list[CallResult]]]


def _send_in_waves(
    ctx: Context, run: Runner, claims: Sequence[Claim], width: int, release: Callable[[int], None]
) -> list[ChargeOutcome]:
    """Mark `sending`, send and record, `width` attempts at a time: an attempt is marked `sending` only when its
    call is about to be made, so the others wait `pending` (a crash leaves them to be retried, not reviewed).
    Answers are recorded as they arrive, a group at a time, so that a slow call (a rate-limited one) does not
    keep the others' answers unrecorded, where a crash would turn them into reviews. In the last wave, the
    slots of answered calls go back (`release`) before their answers are recorded."""
    stop = _Stop()
    done: list[ChargeOutcome] = []
    for start in range(0, len(claims), width):
        wave = claims[start : start + width]
        last = start + width >= len(claims)
        if stop.reason is not None:
            done.extend(record_outcomes(ctx, [CallResult(c, error=_held_back(stop.reason)) for c in wave]))
            continue
        sending, lost = mark_sending(ctx, wave)
        done.extend(lost)
        for group in run(sending, stop) if sending else ():
            if last:
                release(len(group))
            done.extend(record_outcomes(ctx, group))
    return done


def _held_back(pause: PauseReason) -> HeldBack:
    return HeldBack(f"not sent: an earlier answer of the batch paused billing ({pause})", pause=pause)


def _fields(claim: Claim) -> dict[str, Any]:
    return {
        "card_id": claim.card_tpaga_id,
        "amount": claim.amount.major,
        "currency": claim.amount.currency,
        "order_id": claim.order_id,
        "description": claim.description,
        "tax_amount": claim.tax_amount.major if claim.tax_amount else Decimal(0),
        "iac_amount": claim.iac_amount.major if claim.iac_amount else Decimal(0),
    }


class _Wave:
    """The checks every call of a wave passes just before it is made, and what its answer stops."""

    def __init__(self, ctx: Context, stop: _Stop) -> None:
        self.stop = stop
        # The last moment a request of this wave may be written: its answer (connect + read timeouts) must come
        # before the lease taken when the wave was marked `sending` ends. The client waits for the rate limiter
        # no longer than this and checks it again right before writing; past it, the call is not sent.
        lease, answer = ctx.sending_lease.total_seconds(), ctx.answer_time.total_seconds()
        self.deadline = time.monotonic() + max(0.0, lease - answer)

    def held_back(self, claim: Claim) -> CallResult | None:
        if self.stop.reason is not None:
            return CallResult(claim, error=_held_back(self.stop.reason))
        if time.monotonic() > self.deadline:
            return CallResult(claim, error=HeldBack("held too long before sending; not sent"))
        return None

    def answered(self, result: CallResult) -> CallResult:
        reason = _pause_reason(result.error)
        if reason is not None:
            self.stop.reason = reason
        return result


def _pool_runner(ctx: Context, pool: GatewayPool) -> Runner:
    def run(claims: Sequence[Claim], stop: _Stop) -> Iterator[list[CallResult]]:
        wave = _Wave(ctx, stop)

        async def send(claim: Claim) -> CallResult:
            held = wave.held_back(claim)
            if held is not None:
                return held
            try:
                charge = await ctx.gateway.charge_async(**_fields(claim), deadline=wave.deadline)
            except Exception as exc:  # an unexpected error may have charged: recorded as unknown
                return wave.answered(CallResult(claim, error=exc))
            return wave.answered(CallResult(claim, charge=charge))

        return pool.as_answered(send, claims)

    return run


def _inline_runner(ctx: Context) -> Runner:
    def run(claims: Sequence[Claim], stop: _Stop) -> Iterator[list[CallResult]]:
        wave = _Wave(ctx, stop)
        for claim in claims:
            held = wave.held_back(claim)
            if held is None:
                try:
                    held = wave.answered(
                        CallResult(claim, charge=ctx.gateway.charge(**_fields(claim), deadline=wave.deadline))
                    )
                except Exception as exc:  # an unexpected error may have charged: recorded as unknown
                    held = wave.answered(CallResult(claim, error=exc))
            yield [held]

    return run


def _pause_reason(error: BaseException | None) -> PauseReason | None:
    """The pause an answer causes, if any."""
    if isinstance(error, gw.UnauthorizedError):
        return PauseReason.UNAUTHORIZED
    if isinstance(error, gw.DeclinedError) and error.decline_class == DeclineClass.MERCHANT:
        return PauseReason.MERCHANT_DECLINE
    return None
