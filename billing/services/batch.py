"""Charging a batch of invoices: three transactions for the whole batch, the gateway calls concurrent.

`charge_invoices` runs the same phases as `charging.charge_invoice` (claim, mark sending, call, record; see
`billing.services.charging`), with every database phase done once for the batch and the calls made
concurrently on the process's `GatewayPool`: one event-loop thread where the Tpaga client's `charge_async`
keeps every call of the process in flight on aiohttp keep-alive connections (a gateway without `charge_async`,
such as a test fake, is called on the loop's executor threads instead).

Crash semantics are the single path's: attempts are claimed `pending` (a worker lost before marking them
`sending` leaves attempts that reconciliation turns `not_sent` and reschedules), then marked `sending` with a
lease in one transaction just before the requests leave; a worker lost after that leaves them `sending`, the
lease expires and reconciliation flags them `unknown` for review. To keep that set to what really is in
flight, a batch takes its share of the process's gateway slots (BILLING_GATEWAY_CONCURRENCY) BEFORE claiming,
and marks, sends and records in waves of the slots it holds (one wave, unless the pool was short: a batch starts
with at least half the slots it wants). A request that would leave later than half the lease is not sent
(`not_sent`, retried). After an answer that pauses billing (401, merchant-class decline) the batch sends
nothing more. If a batch's record transaction fails for a reason other than the database being unreachable,
its outcomes are recorded one transaction each (see `charging.record_outcomes`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from billing.domain.declines import DeclineClass
from billing.gateway import errors as gw
from billing.gateway.aio import close_transports
from billing.services.charging import (
    ChargeOutcome,
    Claim,
    HeldBack,
    Sent,
    call_gateway_async,
    claim_invoices,
    mark_sending,
    record_outcomes,
)
from billing.services.context import Context

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_GATEWAY_CONCURRENCY = 64
MAX_BATCH = 1000


class GatewayPool:
    """Bounded concurrency for gateway calls in one process: at most `size` calls in flight, made on one
    event-loop thread, and slots handed out first come, first served (a batch waiting for slots is not
    overtaken by later, smaller ones).

    The loop thread starts on first use, in the process that uses it (after a fork, never before). Blocking
    work the loop hands off (a gateway without `charge_async`, the rate limiter's Redis round trip) runs on the
    loop's default executor, up to `size` threads started on demand."""

    def __init__(self, size: int = DEFAULT_GATEWAY_CONCURRENCY) -> None:
        if size < 1:
            raise ValueError("a gateway pool needs at least one slot")
        self.size = size
        self._cond = threading.Condition()
        self._free = size
        self._queue: deque[object] = deque()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def acquire(self, wanted: int) -> int:
        """Block until this caller is first in line and at least half of min(wanted, size) slots are free; take
        up to min(wanted, size) and return how many. (Waiting for every slot a batch wants would leave slots
        idle whenever the pool's size is not a multiple of the batch size; a batch that starts with fewer slots
        than calls sends the rest in further waves.)"""
        wanted = max(1, min(wanted, self.size))
        enough = max(1, wanted // 2)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._free < enough:
                self._cond.wait()
            self._queue.popleft()
            granted = min(wanted, self._free)
            self._free -= granted
            self._cond.notify_all()
        return granted

    def release(self, count: int) -> None:
        if count <= 0:
            return
        with self._cond:
            self._free += count
            self._cond.notify_all()

    @contextmanager
    def slots(self, wanted: int) -> Iterator[list[int]]:
        """Hold slots for a block; the block may give some back early by lowering the list's only item."""
        held = [self.acquire(wanted)]
        try:
            yield held
        finally:
            self.release(held[0])

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="tpaga"))
                thread = threading.Thread(target=loop.run_forever, name="tpaga-loop", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, fn: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R]:
        """`fn` over `items` concurrently on the pool's event loop, results in order; blocks the caller until
        all are done. `fn` should not raise (an exception is raised here at once; the other calls go on).

        The calls start one loop iteration apart: between two starts the loop reads whatever answers have
        arrived, so an early answer that stops a batch (a 401) is seen before the rest of the wave leaves.
        Started all at once, a wave of 100 charges is written in ~15 ms, before any answer is read."""

        async def every() -> list[R]:
            started = []
            for item in items:
                started.append(asyncio.ensure_future(fn(item)))
                await asyncio.sleep(0)
            return list(await asyncio.gather(*started))

        return asyncio.run_coroutine_threadsafe(every(), self._running_loop()).result()

    def shutdown(self) -> None:
        """Close the loop's HTTP sessions, stop the loop and join its thread (and the executor's)."""
        with self._start_lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(close_transports(), loop).result(timeout=10)
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def charge_invoices(
    ctx: Context, invoice_ids: Sequence[int], *, pool: GatewayPool | None = None
) -> list[ChargeOutcome]:
    """Charge every invoice of the batch that is due now; one outcome per distinct id, in the given order.

    Idempotent like `charge_invoice`: an id that is not claimable now (paid, in review, not due, claimed by a
    concurrent batch, unknown) gets the reason instead, and nothing is sent for it.
    """
    ids = list(dict.fromkeys(invoice_ids))
    if not ids:
        return []
    own = pool is None
    gateway_pool = GatewayPool(min(len(ids), DEFAULT_GATEWAY_CONCURRENCY)) if pool is None else pool
    try:
        with gateway_pool.slots(len(ids)) as held:
            claims, outcomes = claim_invoices(ctx, ids)
            give_back = held[0] - min(held[0], len(claims))
            gateway_pool.release(give_back)
            held[0] -= give_back
            done, last_wave = _send_in_waves(ctx, gateway_pool, claims, max(1, held[0]))
        done.extend(record_outcomes(ctx, last_wave))  # the slots are free for other batches meanwhile
    finally:
        if own:
            gateway_pool.shutdown()
    for outcome in done:
        outcomes[outcome.invoice_id] = outcome
    return [outcomes[i] for i in ids]


class _Stop:
    """Set by the first answer of a batch that pauses billing: the batch sends nothing more."""

    reason: str | None = None


def _send_in_waves(
    ctx: Context, pool: GatewayPool, claims: Sequence[Claim], width: int
) -> tuple[list[ChargeOutcome], list[Sent]]:
    """Mark `sending`, send and record, `width` attempts at a time (the slots this batch holds; usually the
    whole batch): an attempt is marked `sending` only when a thread is about to call for it, and its answer is
    recorded with its wave's, so the others wait `pending` (a crash leaves them to be retried, not reviewed).
    After a 401 or a merchant-class decline, nothing more is marked or sent: every other request would meet
    the same answer, and a gateway may lock a merchant that keeps trying.

    Returns the outcomes recorded so far and the last wave's answers, which the caller records."""
    stop = _Stop()
    done: list[ChargeOutcome] = []
    wave_sent: list[Sent] = []
    for start in range(0, len(claims), width):
        done.extend(record_outcomes(ctx, wave_sent))
        wave = claims[start : start + width]
        if stop.reason is not None:
            wave_sent = [Sent(c, error=_held_back(stop.reason)) for c in wave]
            continue
        sending, lost = mark_sending(ctx, wave)
        done.extend(lost)
        wave_sent = pool.run(_sender(ctx, stop), sending) if sending else []
    return done, wave_sent


def _held_back(pause: str) -> HeldBack:
    return HeldBack(f"not sent: an earlier answer of the batch paused billing ({pause})", pause=pause)


def _sender(ctx: Context, stop: _Stop) -> Callable[[Claim], Awaitable[Sent]]:
    guard_seconds = ctx.sending_lease.total_seconds() / 2
    marked_at = time.monotonic()

    async def send(claim: Claim) -> Sent:
        if stop.reason is not None:
            return Sent(claim, error=_held_back(stop.reason))
        if time.monotonic() - marked_at > guard_seconds:
            # Sent this late, the answer could arrive after reconciliation has given the attempt up.
            return Sent(claim, error=HeldBack("held too long before sending; not sent"))
        result = await call_gateway_async(ctx, claim)
        reason = _pause_reason(result.error)
        if reason is not None:
            stop.reason = reason
        return result

    return send


def _pause_reason(error: BaseException | None) -> str | None:
    """The pause an answer causes (as the single path records it), if any."""
    if isinstance(error, gw.UnauthorizedError):
        return "unauthorized"
    if isinstance(error, gw.DeclinedError) and error.decline_class == DeclineClass.MERCHANT:
        return "merchant_decline"
    return None
