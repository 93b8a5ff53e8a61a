"""The batch path (`billing.charge_invoices`): many invoices per claim and per record transaction, the calls
concurrent, with the same outcomes, dunning and safety as one charge_invoice per invoice."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from billing.db.models import Card, ChargeAttempt, Event, Invoice, OutboxMessage, Subscription
from billing.gateway import errors as gw
from billing.gateway.pool import GatewayPool
from billing.services import charging
from billing.services.charging import CallResult, charge_invoices
from billing.services.charging import outcomes as charging_outcomes
from billing.services.charging.claims import claim_invoices, mark_sending
from billing.services.invoicing import open_due_invoices
from billing.services.reconcile import expire_stuck_attempts
from tests.fakes import FakeGateway
from tests.test_services import World, make_world, no_double_charges


class FakeGatewayWith422(FakeGateway):
    """The fake gateway, plus a script word "422": Tpaga refuses the request's fields (nothing charged)."""

    def charge(self, **kw: Any) -> Any:
        with self._lock:
            script = self._card_scripts.setdefault(kw["card_id"], ["00"])
            if script and script[0] == "422":
                self.calls["charge"] += 1
                if len(script) > 1:
                    script.pop(0)
                raise gw.ValidationError("creditCard: unknown card", operation="charge")
        return super().charge(**kw)


@pytest.fixture
def world(sqlite_url: str) -> World:
    return make_world(sqlite_url)


def _open(world: World) -> list[int]:
    open_due_invoices(world.ctx)
    with world.ctx.sessions() as s:
        return list(s.execute(select(Invoice.id).where(Invoice.state == "open").order_by(Invoice.id)).scalars())


def _invoice(world: World, invoice_id: int) -> Invoice:
    with world.ctx.sessions() as s:
        invoice = s.get(Invoice, invoice_id)
        assert invoice is not None
        return invoice


def _race(workers: int, work: Any) -> None:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            barrier.wait()
            work(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_every_outcome_kind_in_one_batch_is_recorded_as_the_single_path_records_it(sqlite_url: str):
    # Given one due invoice per kind of gateway answer...
    world = make_world(sqlite_url)
    world.gateway = FakeGatewayWith422()
    world.ctx.gateway = world.gateway
    scripts = {
        "approved": ["00"],
        "soft": ["51"],
        "hard": ["14"],
        "unknown_dropped": ["unknown"],
        "unknown_9999": ["9999"],
        "not_sent": ["not_sent"],
        "rejected": ["422"],
    }
    subs = {kind: world.subscriber(script=script) for kind, script in scripts.items()}
    # ...and invoices that must not be charged: one paid already, one whose subscription was canceled (after
    # its invoice was opened), one whose customer has no usable card left
    paid_before, canceled, no_card = world.subscriber(), world.subscriber(), world.subscriber()
    ids = _open(world)
    by_kind = {kind: world.invoices(sub)[0].id for kind, sub in subs.items()}
    paid_invoice, canceled_invoice, no_card_invoice = (
        world.invoices(s)[0].id for s in (paid_before, canceled, no_card)
    )
    assert charging.charge_invoice(world.ctx, paid_invoice).outcome == "approved"
    customer = world.subscription(no_card).customer_id
    with world.ctx.unit_of_work() as s:
        s.execute(update(Subscription).where(Subscription.id == canceled).values(status="canceled"))
        s.execute(update(Card).where(Card.customer_id == customer).values(status="unusable"))
    missing = 987_654

    # When they are charged in one batch, with an unknown id and a duplicate among them
    outcomes = charge_invoices(world.ctx, [*ids, missing, ids[0]])

    # Then each gets the outcome the single path would give it, in the order asked, once per id
    got = {o.invoice_id: o for o in outcomes}
    assert [o.invoice_id for o in outcomes] == [*ids, missing]
    assert got[by_kind["approved"]].outcome == "approved"
    assert (got[by_kind["soft"]].outcome, got[by_kind["soft"]].error_code) == ("declined", "51")
    assert (got[by_kind["hard"]].outcome, got[by_kind["hard"]].error_code) == ("declined", "14")
    assert got[by_kind["unknown_dropped"]].outcome == "unknown"
    assert got[by_kind["unknown_9999"]].outcome == "unknown"
    assert got[by_kind["not_sent"]].outcome == "not_sent"
    assert got[by_kind["rejected"]].outcome == "rejected"
    assert got[paid_invoice].outcome == "already_paid"
    assert got[canceled_invoice].outcome == "void"
    assert got[no_card_invoice].outcome == "no_usable_card"
    assert got[missing].outcome == "not_found"

    # And the database holds what the single path writes for each
    state = {kind: _invoice(world, invoice_id) for kind, invoice_id in by_kind.items()}
    assert state["approved"].state == "paid"
    assert state["soft"].state == "open" and state["soft"].due_at is not None and state["soft"].soft_failures == 1
    assert state["hard"].state == "open" and state["hard"].due_at is None
    assert world.subscription(subs["hard"]).status == "past_due"
    assert state["unknown_dropped"].state == "review" and state["unknown_9999"].state == "review"
    assert state["not_sent"].state == "open" and state["not_sent"].due_at is not None
    assert state["rejected"].state == "review"
    assert _invoice(world, canceled_invoice).state == "void"
    assert world.subscription(no_card).status == "past_due"
    attempts = {kind: world.attempts(invoice_id)[-1] for kind, invoice_id in by_kind.items()}
    assert {kind: a.state for kind, a in attempts.items()} == {
        "approved": "approved",
        "soft": "declined",
        "hard": "declined",
        "unknown_dropped": "unknown",
        "unknown_9999": "unknown",
        "not_sent": "not_sent",
        "rejected": "not_sent",
    }
    assert attempts["unknown_9999"].tpaga_charge_id and attempts["unknown_9999"].http_status == 402
    assert attempts["approved"].authorization_code == "123456"
    with world.ctx.sessions() as s:
        card = s.get(Card, attempts["hard"].card_id)
        kinds = Counter(s.execute(select(Event.kind)).scalars())
    assert card is not None and (card.status, card.unusable_code) == ("unusable", "14")
    assert kinds["charge.approved"] == 2 and kinds["charge.declined"] == 2 and kinds["attempt.unknown"] == 2
    assert kinds["charge.not_sent"] == 1 and kinds["attempt.rejected"] == 1
    # Tpaga saw one request per invoice that was due and chargeable, and none for the others
    assert world.gateway.calls["charge"] == 1 + 7
    no_double_charges(world)


def test_a_batch_delivered_twice_charges_each_invoice_once(world: World):
    for _ in range(5):
        world.subscriber()
    ids = _open(world)
    first = charge_invoices(world.ctx, ids)
    second = charge_invoices(world.ctx, ids)
    assert [o.outcome for o in first] == ["approved"] * 5
    assert [o.outcome for o in second] == ["already_paid"] * 5
    assert world.gateway.calls["charge"] == 5
    no_double_charges(world)


def test_the_single_path_and_a_batch_of_one_agree(world: World):
    world.subscriber(script=["51"])
    world.subscriber(script=["51"])
    first, second = _open(world)
    assert charging.charge_invoice(world.ctx, first).as_dict() | {"invoice_id": 0, "attempt_id": 0} == (
        charge_invoices(world.ctx, [second])[0].as_dict() | {"invoice_id": 0, "attempt_id": 0}
    )
    a, b = _invoice(world, first), _invoice(world, second)
    assert (a.state, a.due_at, a.soft_failures) == (b.state, b.due_at, b.soft_failures)


def _overlapping_batches(url: str) -> None:
    # Given 60 due invoices of subscriptions two periods behind (two invoices each in the same batches)
    world = make_world(url)
    subs = [world.subscriber() for _ in range(30)]
    world.advance(days=31)
    ids = _open(world)
    assert len(ids) == 2 * len(subs)
    pool = GatewayPool(8)

    # When six threads charge overlapping batches at once (and two of them the very same batch)
    def work(n: int) -> None:
        start = (n * 10) % len(ids)
        charge_invoices(world.ctx, (ids + ids)[start : start + 40], pool=pool)

    _race(6, work)
    pool.shutdown()
    # Then every invoice was charged exactly once
    with world.ctx.sessions() as s:
        states = Counter(s.execute(select(Invoice.state)).scalars())
        approved = s.execute(select(func.count()).where(ChargeAttempt.state == "approved")).scalar_one()
    assert states == {"paid": len(ids)}
    assert approved == len(ids) == world.gateway.calls["charge"]
    assert all(world.subscription(sub).status == "active" for sub in subs)
    no_double_charges(world)


def test_overlapping_batches_from_many_threads_on_sqlite_charge_each_invoice_once(sqlite_url: str):
    _overlapping_batches(sqlite_url)


@pytest.mark.postgres
def test_overlapping_batches_from_many_threads_on_postgresql_charge_each_invoice_once(pg_url: str):
    _overlapping_batches(pg_url)


def _racing_openers_and_chargers(url: str) -> None:
    # Given 50 due subscriptions
    world = make_world(url)
    for _ in range(50):
        world.subscriber()

    # When four threads open invoices and charge every open invoice in batches of 7, all at once
    def work(n: int) -> None:
        for _ in range(3):
            open_due_invoices(world.ctx, limit=20, batch_size=7)
            with world.ctx.sessions() as s:
                ids = list(s.execute(select(Invoice.id).where(Invoice.state == "open")).scalars())
            for start in range(0, len(ids), 7):
                charge_invoices(world.ctx, ids[start : start + 7])

    _race(4, work)
    # Then there is one invoice per subscription, paid with one charge
    with world.ctx.sessions() as s:
        states = Counter(s.execute(select(Invoice.state)).scalars())
    assert states == {"paid": 50}
    assert world.gateway.calls["charge"] == 50
    no_double_charges(world)


def test_racing_openers_and_batch_chargers_on_sqlite(sqlite_url: str):
    _racing_openers_and_chargers(sqlite_url)


@pytest.mark.postgres
def test_racing_openers_and_batch_chargers_on_postgresql(pg_url: str):
    _racing_openers_and_chargers(pg_url)


def test_opening_enqueues_one_batch_message_per_batch_size_invoices(world: World):
    for _ in range(7):
        world.subscriber()
    assert open_due_invoices(world.ctx, batch_size=3) == 7
    with world.ctx.sessions() as s:
        rows = s.execute(select(OutboxMessage.task_name, OutboxMessage.kwargs).order_by(OutboxMessage.id)).all()
        opened = list(s.execute(select(Invoice.id).order_by(Invoice.id)).scalars())
    assert [name for name, _ in rows] == ["billing.charge_invoices"] * 3
    assert [len(kwargs["invoice_ids"]) for _, kwargs in rows] == [3, 3, 1]
    assert sorted(i for _, kwargs in rows for i in kwargs["invoice_ids"]) == opened


def test_a_batch_size_of_one_enqueues_one_charge_invoice_per_invoice(world: World):
    for _ in range(3):
        world.subscriber()
    open_due_invoices(world.ctx, batch_size=1)
    with world.ctx.sessions() as s:
        rows = s.execute(select(OutboxMessage.task_name, OutboxMessage.kwargs)).all()
    assert sorted(name for name, _ in rows) == ["billing.charge_invoice"] * 3
    assert all(set(kwargs) == {"invoice_id"} for _, kwargs in rows)


def test_catch_up_after_downtime_opens_every_period_in_one_pass(world: World):
    sub = world.subscriber()
    world.advance(days=95)  # Jan 31 + 95 days: four periods have started
    assert open_due_invoices(world.ctx) == 4
    assert [i.period_index for i in world.invoices(sub)] == [0, 1, 2, 3]
    assert open_due_invoices(world.ctx) == 0
    assert world.subscription(sub).next_period_index == 4


def test_a_worker_lost_after_claiming_a_batch_leaves_attempts_that_are_retried(world: World):
    for _ in range(3):
        world.subscriber()
    ids = _open(world)
    claims, _ = claim_invoices(world.ctx, ids)  # ...and the worker died before marking them sending
    assert len(claims) == 3
    assert [o.outcome for o in charge_invoices(world.ctx, ids)] == ["not_scheduled"] * 3
    world.advance(minutes=6)
    assert expire_stuck_attempts(world.ctx) == {"not_sent": 3, "unknown": 0}
    assert [o.outcome for o in charge_invoices(world.ctx, ids)] == ["approved"] * 3
    assert world.gateway.calls["charge"] == 3


def test_a_worker_lost_while_a_batch_is_sending_leaves_unknown_attempts_in_review(world: World):
    for _ in range(2):
        world.subscriber()
    ids = _open(world)
    claims, _ = claim_invoices(world.ctx, ids)
    sending, lost = mark_sending(world.ctx, claims)  # ...and the worker died with them in flight
    assert len(sending) == 2 and lost == []
    world.advance(minutes=6)
    assert expire_stuck_attempts(world.ctx) == {"not_sent": 0, "unknown": 2}
    assert {_invoice(world, i).state for i in ids} == {"review"}
    assert [o.outcome for o in charge_invoices(world.ctx, ids)] == ["in_review"] * 2


def test_a_late_answer_after_the_lease_expired_still_wins(world: World):
    world.subscriber()
    ids = _open(world)
    claims, _ = claim_invoices(world.ctx, ids)
    sending, _ = mark_sending(world.ctx, claims)
    world.advance(minutes=6)
    expire_stuck_attempts(world.ctx)
    sent = [
        CallResult(
            c,
            charge=world.gateway.charge(
                card_id=c.card_tpaga_id, amount=c.amount.major, currency=c.amount.currency, order_id=c.order_id
            ),
        )
        for c in sending
    ]
    assert [o.outcome for o in charging_outcomes.record_outcomes(world.ctx, sent)] == ["approved"]
    assert _invoice(world, ids[0]).state == "paid"


def test_a_request_held_past_half_the_lease_is_not_sent(world: World):
    world.subscriber()
    ids = _open(world)
    world.ctx.sending_lease = timedelta(seconds=-1)  # every request is "too late" the moment it is marked
    assert [o.outcome for o in charge_invoices(world.ctx, ids)] == ["not_sent"]
    assert world.gateway.calls["charge"] == 0
    assert world.attempts(ids[0])[0].state == "not_sent"


def test_a_paused_billing_claims_nothing(world: World):
    world.subscriber(script=["401"])
    world.subscriber()
    ids = _open(world)
    outcomes = charge_invoices(world.ctx, ids[:1])
    assert [o.outcome for o in outcomes] == ["paused"]
    assert [o.outcome for o in charge_invoices(world.ctx, ids)] == ["paused", "paused"]
    assert world.gateway.calls["charge"] == 1


def test_the_gateway_pool_hands_out_at_most_its_size_first_come_first_served() -> None:
    pool = GatewayPool(4)
    assert pool.acquire(10) == 4
    order: list[tuple[str, int]] = []

    def take(name: str, wanted: int) -> None:
        order.append((name, pool.acquire(wanted)))

    big = threading.Thread(target=take, args=("big", 4))
    big.start()
    while not pool._queue:  # the big request is waiting in line
        threading.Event().wait(0.001)
    small = threading.Thread(target=take, args=("small", 1))
    small.start()
    while len(pool._queue) < 2:
        threading.Event().wait(0.001)
    pool.release(1)  # one free slot: enough for the small request, which must not jump the queue
    threading.Event().wait(0.05)
    assert order == []
    pool.release(1)  # two: half of what the big request wants, so it starts with those two
    big.join(5)
    assert order == [("big", 2)]
    pool.release(2)
    small.join(5)
    assert order == [("big", 2), ("small", 1)]
    pool.shutdown()


def test_gateway_pool_runs_coroutines_concurrently_in_order_and_restarts_after_shutdown() -> None:
    pool = GatewayPool(4)
    gate = threading.Barrier(3, timeout=5)  # three calls must be in flight at once to pass it

    async def double(x: int) -> int:
        await asyncio.get_running_loop().run_in_executor(None, gate.wait)
        return x * 2

    assert pool.run(double, [1, 2, 3]) == [2, 4, 6]
    pool.shutdown()
    pool.shutdown()  # idempotent
    gate.reset()
    assert pool.run(double, [4, 5, 6]) == [8, 10, 12]  # a new loop after shutdown
    pool.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"invoice_ids": [1, 2, 3]}, None),
        ({"invoice_ids": 5}, "invoice_ids must be a list of integer ids, got 5 (a int)"),
        ({"invoice_ids": "1,2"}, "invoice_ids must be a list of integer ids, got '1,2' (a str)"),
        ({"invoice_ids": []}, "invoice_ids must hold 1 to 1000 ids, got 0"),
        ({"invoice_ids": list(range(1, 1002))}, "invoice_ids must hold 1 to 1000 ids, got 1001"),
        ({"invoice_ids": [1, "2"]}, "invoice_ids[1] must be an integer id, got '2' (a str)"),
        ({"invoice_ids": [1, True]}, "invoice_ids[1] must be an integer id, got True (a bool)"),
        ({"invoice_ids": [0]}, "invoice_ids[0] must be a positive integer id, got 0"),
        ({}, "missing required argument(s) invoice_ids"),
        ({"invoice_ids": [1], "invoice_id": 1}, "unexpected argument(s) invoice_id; it takes invoice_ids"),
    ],
)
def test_the_batch_task_checks_its_ids_precisely(kwargs: dict[str, Any], message: str | None) -> None:
    import tasks
    from tasks.errors import TaskInputError

    task = tasks.app.tasks["billing.charge_invoices"]
    if message is None:
        assert task.validate((), kwargs) == kwargs
    else:
        with pytest.raises(TaskInputError) as caught:
            task.validate((), kwargs)
        assert str(caught.value) == f"billing.charge_invoices: {message}"


def test_the_batch_task_shows_its_ids_in_logs_and_flower() -> None:
    from tasks.masking import masked_reprs

    assert masked_reprs((), {"invoice_ids": [4, 5]}, ("invoice_ids",), set()) == ("()", "{'invoice_ids': [4, 5]}")
    assert masked_reprs((), {"invoice_ids": [4, "t"]}, ("invoice_ids",), set())[1] == "{'invoice_ids': '***'}"


def test_an_empty_batch_does_nothing(world: World) -> None:
    assert charge_invoices(world.ctx, []) == []


def test_the_worker_settings_for_batches_come_from_the_app_and_the_environment() -> None:
    from billing.config import ConfigError
    from tasks.config import TaskSettings, celery_config

    defaults = TaskSettings.from_env({})
    assert (defaults.charge_batch_size, defaults.gateway_concurrency) == (100, 300)
    conf = celery_config(defaults)  # what `celery -A tasks worker` runs with, no options given
    assert (conf["worker_pool"], conf["worker_concurrency"], conf["worker_prefetch_multiplier"]) == ("threads", 32, 1)
    tuned = TaskSettings.from_env({"BILLING_CHARGE_BATCH_SIZE": "250", "BILLING_GATEWAY_CONCURRENCY": "64"})
    assert (tuned.charge_batch_size, tuned.gateway_concurrency) == (250, 64)
    # the variable's earlier name is still read, and the new name wins when both are set
    assert TaskSettings.from_env({"BILLING_GATEWAY_THREADS": "64"}).gateway_concurrency == 64
    both = {"BILLING_GATEWAY_THREADS": "64", "BILLING_GATEWAY_CONCURRENCY": "128"}
    assert TaskSettings.from_env(both).gateway_concurrency == 128
    for env, variable in (
        ({"BILLING_CHARGE_BATCH_SIZE": "1001"}, "BILLING_CHARGE_BATCH_SIZE"),
        ({"BILLING_CHARGE_BATCH_SIZE": "0"}, "BILLING_CHARGE_BATCH_SIZE"),
        ({"BILLING_GATEWAY_CONCURRENCY": "none"}, "BILLING_GATEWAY_CONCURRENCY"),
        ({"BILLING_GATEWAY_CONCURRENCY": "0"}, "BILLING_GATEWAY_CONCURRENCY"),
        ({"BILLING_GATEWAY_THREADS": "none"}, "BILLING_GATEWAY_THREADS"),
    ):
        with pytest.raises(ConfigError, match=variable):
            TaskSettings.from_env(env)


def test_the_batch_task_is_routed_with_the_charges() -> None:
    import tasks

    route = tasks.app.amqp.router.route({}, "billing.charge_invoices", (), {})
    assert route["queue"].name == "billing.charges"


def test_after_a_401_the_batch_sends_nothing_more_and_pauses_billing(world: World):
    # Given five due invoices and a gateway that has revoked our key
    for _ in range(5):
        world.subscriber()
    ids = _open(world)
    world.gateway.authorized = False
    # When they are charged in one batch, one call at a time
    pool = GatewayPool(1)
    outcomes = charge_invoices(world.ctx, ids, pool=pool)
    pool.shutdown()
    # Then only the first request went out; every invoice waits for billing to resume, nothing was spent
    assert world.gateway.calls["charge"] == 1
    assert [o.outcome for o in outcomes] == ["paused"] * 5
    assert {a.state for i in ids for a in world.attempts(i)} == {"not_sent"}
    assert {_invoice(world, i).state for i in ids} == {"open"}
    assert all(_invoice(world, i).due_at is not None for i in ids)
    assert world.status()["paused"]


def test_after_a_merchant_decline_the_batch_sends_nothing_more(world: World):
    world.subscriber(script=["03"])  # 03: invalid merchant, our misconfiguration
    for _ in range(3):
        world.subscriber()
    ids = _open(world)
    pool = GatewayPool(1)
    outcomes = charge_invoices(world.ctx, ids, pool=pool)
    pool.shutdown()
    assert world.gateway.calls["charge"] == 1
    assert [o.outcome for o in outcomes] == ["declined", "paused", "paused", "paused"]
    from billing.db import control

    with world.ctx.sessions() as s:
        assert control.get_pause(s)["error_code"] == "03"  # the decline's pause, not a held-back call's


class CountingSending(FakeGateway):
    """Notes, at every charge, how many attempts are `sending` in the database."""

    sending_seen: list[int]
    ctx: Any = None

    def charge(self, **kw: Any) -> Any:
        with self.ctx.sessions() as s:
            self.sending_seen.append(
                s.execute(select(func.count()).where(ChargeAttempt.state == "sending")).scalar_one()
            )
        return super().charge(**kw)


def test_a_batch_marks_sending_only_what_its_slots_are_calling_for(sqlite_url: str):
    world = make_world(sqlite_url)
    world.gateway = CountingSending()
    world.gateway.sending_seen = []
    world.gateway.ctx = world.ctx
    world.ctx.gateway = world.gateway
    for _ in range(7):
        world.subscriber()
    ids = _open(world)
    pool = GatewayPool(2)
    assert [o.outcome for o in charge_invoices(world.ctx, ids, pool=pool)] == ["approved"] * 7
    pool.shutdown()
    # waves of two, each recorded before the next is marked: never more than one wave `sending`, the others
    # `pending` (a crash would leave those to be retried, not reviewed)
    assert world.gateway.sending_seen == [2, 2, 2, 2, 2, 2, 1]


def test_when_the_batch_transaction_fails_each_outcome_is_recorded_on_its_own(world: World, monkeypatch: Any):
    for _ in range(4):
        world.subscriber()
    ids = _open(world)
    real = charging_outcomes.record_approvals
    poisoned = {ids[2]}

    def record_approvals(ctx: Any, session: Any, now: Any, answers: list[Any], invoices: Any) -> Any:
        if any(answer.invoice_id in poisoned for answer in answers):
            raise ValueError("a row this code cannot write")
        return real(ctx, session, now, answers, invoices)

    monkeypatch.setattr(charging_outcomes, "record_approvals", record_approvals)
    outcomes = charge_invoices(world.ctx, ids)
    # the three others are recorded; the poisoned one stays `sending` for reconciliation to flag
    assert [o.outcome for o in outcomes] == ["approved", "approved", "unrecorded", "approved"]
    assert [_invoice(world, i).state for i in ids] == ["paid", "paid", "open", "paid"]
    assert world.attempts(ids[2])[0].state == "sending"
    world.advance(minutes=6)
    assert expire_stuck_attempts(world.ctx) == {"not_sent": 0, "unknown": 1}


class AsyncRevokedKey(FakeGateway):
    """A gateway with `charge_async` (the batch's event-loop path) that has revoked our key: each call is
    counted when it leaves, waits for its answer (one loop iteration), and gets a 401."""

    async def charge_async(self, **kw: Any) -> Any:
        with self._lock:
            self.calls["charge"] += 1
        await asyncio.sleep(0)
        raise gw.UnauthorizedError("invalid key", operation="charge")


def test_a_wave_on_the_event_loop_stops_at_the_first_401_instead_of_leaving_whole(sqlite_url: str):
    # Given 20 due invoices and an async gateway that answers 401
    world = make_world(sqlite_url)
    world.gateway = AsyncRevokedKey()
    world.ctx.gateway = world.gateway
    for _ in range(20):
        world.subscriber()
    ids = _open(world)
    # When they go out as one wave of 20 on the pool's event loop
    pool = GatewayPool(20)
    outcomes = charge_invoices(world.ctx, ids, pool=pool)
    pool.shutdown()
    # Then the answer to the first call was read before the second left: one request, billing paused
    assert world.gateway.calls["charge"] == 1
    assert [o.outcome for o in outcomes] == ["paused"] * 20
    assert world.status()["paused"]
