"""Charging a batch of invoices: three transactions for the whole batch, the gateway calls concurrent.

`charge_invoices` runs the same phases as `charging.charge_invoice` (claim, mark sending, call, record; see
`billing.services.charging`), with every database phase done once for the batch and the calls made on a
bounded thread pool (each pool thread keeps its own keep-alive HTTP session in the Tpaga client).

Crash semantics are the single path's: attempts are claimed `pending` (a worker lost before marking them
`sending` leaves attempts that reconciliation turns `not_sent` and reschedules), then marked `sending` with a
lease in one transaction just before the requests leave; a worker lost after that leaves them `sending`, the
lease expires and reconciliation flags them `unknown` for review. To keep that window small, a batch takes
its share of the process's gateway slots (BILLING_GATEWAY_THREADS) BEFORE claiming: what it claims goes out at
once, or after at most about one gateway latency, instead of waiting behind other batches, so a crash strands
little more than the attempts that really were in flight. A request that still had to wait longer than half
the lease is not sent at all and is recorded `not_sent` (retried).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from billing.gateway.errors import NotSentError
from billing.services.charging import (
    ChargeOutcome,
    Claim,
    Sent,
    call_gateway,
    claim_invoices,
    mark_sending,
    record_outcomes,
)
from billing.services.context import Context

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_GATEWAY_THREADS = 64
MAX_BATCH = 1000


class GatewayPool:
    """Bounded concurrency for gateway calls in one process: a thread pool, and slots handed out first come,
    first served (a batch waiting for slots is not overtaken by later, smaller ones)."""

    def __init__(self, threads: int = DEFAULT_GATEWAY_THREADS) -> None:
        if threads < 1:
            raise ValueError("a gateway pool needs at least one thread")
        self.size = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tpaga")
        self._cond = threading.Condition()
        self._free = threads
        self._queue: deque[object] = deque()

    def acquire(self, wanted: int) -> int:
        """Block until this caller is first in line and at least half of min(wanted, size) slots are free; take
        up to min(wanted, size) and return how many. (Waiting for every slot a batch wants would leave slots
        idle whenever the pool's size is not a multiple of the batch size; a batch that starts with fewer slots
        than calls queues the rest on the pool's threads, about one gateway latency.)"""
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

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items on the pool's threads, results in order."""
        return list(self._executor.map(fn, items))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


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
    gateway_pool = GatewayPool(min(len(ids), DEFAULT_GATEWAY_THREADS)) if pool is None else pool
    try:
        with gateway_pool.slots(len(ids)) as held:
            claims, outcomes = claim_invoices(ctx, ids)
            give_back = held[0] - min(held[0], len(claims))
            gateway_pool.release(give_back)
            held[0] -= give_back
            sending, lost = mark_sending(ctx, claims)
            sent = gateway_pool.map(_sender(ctx), sending) if sending else []
        recorded = record_outcomes(ctx, sent)
    finally:
        if own:
            gateway_pool.shutdown()
    for outcome in (*lost, *recorded):
        outcomes[outcome.invoice_id] = outcome
    return [outcomes[i] for i in ids]


def _sender(ctx: Context) -> Callable[[Claim], Sent]:
    guard_seconds = ctx.sending_lease.total_seconds() / 2
    marked_at = time.monotonic()

    def send(claim: Claim) -> Sent:
        if time.monotonic() - marked_at > guard_seconds:
            # Sent this late, the answer could arrive after reconciliation has given the attempt up.
            return Sent(claim, error=NotSentError("held too long before sending; not sent", operation="charge"))
        return call_gateway(ctx, claim)

    return send
