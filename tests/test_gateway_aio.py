"""`TpagaClient.charge_async` (the batch path's aiohttp transport) over real sockets against the scripted server of
test_gateway_transport: what goes on the wire, how answers and transport failures map to errors, what is retried
and what is never sent twice, the rate limiter, many charges on one loop, closing sessions, and secrets kept out
of errors and logs."""

# ruff: noqa: F811  (the fixtures `stub` and `client` are imported from test_gateway_transport and used by name)

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import ssl
import threading
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from billing.gateway import Charge, DeclinedError, NotSentError, OutcomeUnknownError, TpagaClient, TpagaError
from billing.gateway.aio import classify_aiohttp_error, close_transports
from billing.gateway.pool import GatewayPool
from billing.gateway.ratelimit import LocalRateLimiter
from billing.gateway.transport import USER_AGENT
from tests.test_gateway_mapping import charge_json, declined, voided
from tests.test_gateway_transport import (  # noqa: F401
    BAD_CHARGE_INPUTS,
    CARD_ID,
    PRIVATE_KEY,
    PUBLIC_KEY,
    UNREADABLE_CHARGE_ANSWER_IDS,
    UNREADABLE_CHARGE_ANSWERS,
    Reply,
    StubServer,
    basic,
    client,
    closed_port,
    make_client,
    stub,
)

T = TypeVar("T")

SECRETS = [PRIVATE_KEY, PUBLIC_KEY, CARD_ID, basic(PRIVATE_KEY)[6:]]


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh loop with `asyncio.run`, closing the loop's aiohttp sessions before it ends."""

    async def main() -> T:
        try:
            return await make()
        finally:
            await close_transports()

    return asyncio.run(main())


def charge_async(tpaga: TpagaClient, order_id: str = "inv-1-p1", **overrides: Any) -> Awaitable[Charge]:
    fields: dict[str, Any] = {"card_id": CARD_ID, "amount": Decimal(4500), "order_id": order_id, "description": "plan"}
    fields.update(overrides)
    return tpaga.charge_async(**fields)


def charge_once(tpaga: TpagaClient, order_id: str = "inv-1-p1", **overrides: Any) -> Charge:
    return run(lambda: charge_async(tpaga, order_id, **overrides))


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().split(";")[0]
        for r in caplog.records
        if r.name == "billing.gateway" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[aiohttp.ClientSession]:
    """Every aiohttp session the transport opens during the test."""
    made: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    return made


# --- requests on the wire -----------------------------------------------------------------------------------


def test_an_approved_charge_on_the_wire(stub: StubServer, client: TpagaClient) -> None:
    stub.script(Reply(201, charge_json()), Reply(201, charge_json()))

    async def two() -> tuple[Charge, Charge]:
        first = await charge_async(client, "BRG-1", amount=Decimal("4500.00"))
        second = await charge_async(client, "BRG-2", amount=Decimal("4500.50"), tax_amount=Decimal(5), installments=3)
        return first, second

    first, second = run(two)
    assert isinstance(first, Charge) and first.approved and first.id == "1rnfu463258eph0mlqli4105mjb85kut"
    assert second.approved
    assert [(r.method, r.path) for r in stub.received] == [("POST", "/api/charge/credit_card")] * 2
    whole, cents = stub.received
    assert b'"amount":4500,' in whole.body  # a whole amount is a JSON integer
    assert b'"amount":4500.50' in cents.body  # a JSON number, digit for digit
    assert whole.json() == {
        "creditCard": CARD_ID,
        "amount": 4500,
        "currency": "COP",
        "installments": 1,
        "taxAmount": 0,
        "orderId": "BRG-1",
        "description": "plan",
    }
    assert cents.json() == {
        "creditCard": CARD_ID,
        "amount": Decimal("4500.50"),
        "currency": "COP",
        "installments": 3,
        "taxAmount": 5,
        "orderId": "BRG-2",
        "description": "plan",
    }
    for request in stub.received:
        assert request.headers["authorization"] == basic(PRIVATE_KEY)
        assert request.headers["accept"] == "application/json"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == USER_AGENT
    assert stub.connections == 1  # keep-alive on the loop's session


def test_a_real_decline_is_raised_once(stub: StubServer, client: TpagaClient) -> None:
    stub.script(Reply(402, declined("51")), Reply(201, charge_json()))
    with pytest.raises(DeclinedError) as caught:
        charge_once(client)
    assert caught.value.error_code == "51"
    assert len(stub.received) == 1


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        *UNREADABLE_CHARGE_ANSWERS,
        (Reply(201, b"\x00\x01", content_type="application/json; charset=no-such-codec"), "malformed"),
    ],
    ids=[*UNREADABLE_CHARGE_ANSWER_IDS, "201-unknown-charset"],
)
def test_an_unreadable_or_ambiguous_charge_answer_is_unknown_and_not_retried(
    stub: StubServer, client: TpagaClient, caplog: pytest.LogCaptureFixture, reply: Reply, reason: str
) -> None:
    stub.script(reply, Reply(201, charge_json()))
    with pytest.raises(OutcomeUnknownError) as caught:
        charge_once(client)
    assert caught.value.reason == reason
    assert caught.value.operation == "charge"
    assert len(stub.received) == 1
    assert retry_warnings(caplog) == []


@pytest.mark.parametrize("kwargs", BAD_CHARGE_INPUTS)
def test_charge_inputs_are_checked_before_sending(
    stub: StubServer, client: TpagaClient, sessions: list[aiohttp.ClientSession], kwargs: dict[str, Any]
) -> None:
    stub.script(Reply(201, charge_json()))
    arguments: dict[str, Any] = {"card_id": CARD_ID, "amount": Decimal(4500), "order_id": "o-1"}
    arguments.update(kwargs)
    with pytest.raises(ValueError) as caught:
        run(lambda: client.charge_async(**arguments))
    assert CARD_ID not in str(caught.value)
    assert stub.received == [] and stub.connections == 0
    assert sessions == []  # refused before any session was opened


def test_a_missing_required_field_is_refused_before_sending(stub: StubServer, client: TpagaClient) -> None:
    with pytest.raises(TypeError):
        run(lambda: client.charge_async(card_id=CARD_ID, amount=Decimal(4500)))
    assert stub.received == []


# --- the line between "never left" and "may have reached Tpaga" ------------------------------------------------


def test_connection_refused_is_not_sent_and_a_charge_is_retried_then_raised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="billing.gateway")
    tpaga, _ = make_client(f"http://127.0.0.1:{closed_port()}/api/")
    with pytest.raises(NotSentError) as caught:
        charge_once(tpaga)
    assert caught.value.cause == "ClientConnectorError"
    assert caught.value.http_status is None
    assert retry_warnings(caplog) == [  # three attempts: it never left, so sending again cannot charge twice
        "tpaga charge attempt 1 failed with NotSentError",
        "tpaga charge attempt 2 failed with NotSentError",
    ]


def test_a_connect_timeout_is_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="billing.gateway")
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    filler = socket.socket()
    filler.settimeout(0.3)
    try:
        filler.connect(("127.0.0.1", port))  # fills the backlog: the next handshake never completes
        tpaga, _ = make_client(f"http://127.0.0.1:{port}/api/", connect_timeout_seconds=0.2, retry_attempts=2)
        started = time.monotonic()
        with pytest.raises(NotSentError) as caught:
            charge_once(tpaga)
        assert caught.value.cause == "ConnectionTimeoutError"
        assert retry_warnings(caplog) == ["tpaga charge attempt 1 failed with NotSentError"]
        assert time.monotonic() - started < 2.0  # two 0.2 s connect timeouts and one short backoff
    finally:
        filler.close()
        listener.close()


@pytest.mark.parametrize("reused", [False, True], ids=["fresh-connection", "reused-connection"])
@pytest.mark.parametrize("action", ["drop", "reset"])
def test_a_connection_dropped_after_the_charge_request_is_unknown_and_never_resent(
    stub: StubServer, client: TpagaClient, caplog: pytest.LogCaptureFixture, action: str, reused: bool
) -> None:
    # aiohttp resends a request by itself only when an idempotent one fails on a reused keep-alive connection;
    # a POST must not be resent either way.
    if reused:
        stub.script(Reply(201, charge_json()))
    stub.script(Reply(action=action), Reply(201, charge_json()), Reply(201, charge_json()))

    async def charges() -> None:
        if reused:
            await charge_async(client, "o-0")
        await charge_async(client, "o-1")

    with pytest.raises(OutcomeUnknownError) as caught:
        run(charges)
    assert caught.value.reason == "dropped"
    assert caught.value.charge_id is None
    assert [r.json()["orderId"] for r in stub.received] == (["o-0", "o-1"] if reused else ["o-1"])
    assert stub.connections == 1
    assert retry_warnings(caplog) == []


def test_a_charge_read_timeout_is_unknown_and_never_retried(stub: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    tpaga, _ = make_client(stub.url, read_timeout_seconds=0.3)
    stub.script(Reply(action="hang", seconds=3), Reply(201, charge_json()))
    started = time.monotonic()
    with pytest.raises(OutcomeUnknownError) as caught:
        charge_once(tpaga)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 2.0  # the read timeout, not the server's 3 s hang
    assert len(stub.received) == 1
    assert retry_warnings(caplog) == []


def test_a_stale_keep_alive_connection_does_not_make_a_charge_unknown(stub: StubServer, client: TpagaClient) -> None:
    # The server closes the connection right after answering (as a keep-alive timeout would). The next charge goes
    # out once, on a fresh connection.
    stub.script(Reply(201, charge_json(), action="close_after"), Reply(201, charge_json()))

    async def two() -> Charge:
        await charge_async(client, "o-1")
        await asyncio.sleep(0.1)
        return await charge_async(client, "o-2")

    assert run(two).approved
    assert [r.json()["orderId"] for r in stub.received] == ["o-1", "o-2"]
    assert stub.connections == 2


# --- many charges on one loop ---------------------------------------------------------------------------------


def test_concurrent_charges_on_one_loop(stub: StubServer, client: TpagaClient) -> None:
    stub.script(*[Reply(201, charge_json()) for _ in range(80)])
    in_flight = asyncio.Semaphore(8)
    counts: list[int] = []

    async def bounded(i: int) -> Charge:
        async with in_flight:
            return await charge_async(client, f"o-{i}")

    async def waves() -> list[Charge]:
        first = await asyncio.gather(*(bounded(i) for i in range(40)))
        counts.append(stub.connections)
        second = await asyncio.gather(*(charge_async(client, f"o-{i}") for i in range(40, 80)))
        counts.append(stub.connections)
        return [*first, *second]

    results = run(waves)
    assert len(results) == 80 and all(r.approved for r in results)
    assert sorted(r.json()["orderId"] for r in stub.received) == sorted(f"o-{i}" for i in range(80))
    bounded_wave, unbounded_wave = counts
    assert 1 <= bounded_wave <= 8  # 8 in flight: at most 8 connections, kept alive and reused
    assert unbounded_wave <= 40  # 40 at once may open more, but never more than one per request in flight


def test_concurrent_charges_on_a_gateway_pool(stub: StubServer, client: TpagaClient) -> None:
    stub.script(*[Reply(201, charge_json()) for _ in range(20)])
    pool = GatewayPool(4)
    try:
        first = pool.run(lambda i: charge_async(client, f"o-{i}"), list(range(10)))
        second = pool.run(lambda i: charge_async(client, f"o-{i}"), list(range(10, 20)))
    finally:
        client.close()
        pool.shutdown()
    assert [c.approved for c in first + second] == [True] * 20
    assert sorted(r.json()["orderId"] for r in stub.received) == sorted(f"o-{i}" for i in range(20))
    # At most 10 calls are in flight at once, so 10 connections serve both runs when the second run reuses the
    # loop's session and its kept-alive connections. (How many of the 10 each run opens depends on how soon the
    # first answers come back, so the count per run is not fixed.)
    assert 1 <= stub.connections <= 10


# --- no reference cycles per call ---------------------------------------------------------------------------


def cyclic_garbage(call: Callable[[], object]) -> list[str]:
    """The types of our, tenacity's and aiohttp's objects that `call` left in reference cycles (what only the
    garbage collector frees; at a thousand charges a second its collections were a third of a worker's CPU)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        call()
        gc.collect()
        kinds = [f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return [k for k in kinds if k.startswith(("billing.", "tenacity.", "aiohttp."))]


def test_a_charge_on_the_event_loop_leaves_no_reference_cycles(stub: StubServer, client: TpagaClient) -> None:
    stub.script(*[Reply(201, charge_json()) for _ in range(4)])
    run(lambda: charge_async(client, "o-warm"))  # the loop's first session and connection are made here

    async def three() -> list[Charge]:
        return list(await asyncio.gather(*(charge_async(client, f"o-{i}") for i in range(3))))

    assert cyclic_garbage(lambda: run(three)) == []
    assert len(stub.received) == 4


@pytest.mark.parametrize(
    ("replies", "call"),
    [
        (
            [Reply(201, charge_json())],
            lambda tpaga: tpaga.charge(card_id=CARD_ID, amount=Decimal(4500), order_id="o-1"),
        ),
        ([Reply(202, voided())], lambda tpaga: tpaga.refund("1rnfu463258eph0mlqli4105mjb85kut")),
        ([Reply(503), Reply(200, charge_json())], lambda tpaga: tpaga.get_charge("1rnfu463258eph0mlqli4105mjb85kut")),
    ],
    ids=["charge", "refund", "lookup-retried-after-503"],
)
def test_a_call_on_the_threaded_client_leaves_no_reference_cycles(
    stub: StubServer, client: TpagaClient, replies: list[Reply], call: Callable[[TpagaClient], object]
) -> None:
    stub.script(Reply(404), *replies)
    with pytest.raises(TpagaError):
        client.get_card("cus-1", CARD_ID)  # the threaded transport's session and connection are made here
    assert cyclic_garbage(lambda: call(client)) == []
    assert len(stub.received) == 1 + len(replies)


# --- the rate limiter -------------------------------------------------------------------------------------------


class AcquireOnly:
    """A limiter with `acquire` only (no reserve/pause): records what had been sent and the thread it ran on."""

    def __init__(self, server: StubServer | None = None, error: BaseException | None = None) -> None:
        self.stub = server
        self.error = error
        self.calls: list[tuple[int, int]] = []

    def acquire(self) -> None:
        self.calls.append((len(self.stub.received) if self.stub else 0, threading.get_ident()))
        if self.error is not None:
            raise self.error


def test_a_limiter_with_only_acquire_is_called_before_each_request_off_the_loop(stub: StubServer) -> None:
    limiter = AcquireOnly(stub)
    tpaga, _ = make_client(stub.url, rate_limiter=limiter)
    stub.script(*[Reply(201, charge_json()) for _ in range(3)])
    loop_threads: list[int] = []

    async def three() -> None:
        loop_threads.append(threading.get_ident())
        for i in range(3):
            await charge_async(tpaga, f"o-{i}")

    run(three)
    assert [sent for sent, _ in limiter.calls] == [0, 1, 2]  # each acquire before its own request
    assert all(thread != loop_threads[0] for _, thread in limiter.calls)  # a blocking acquire never blocks the loop


def test_the_limiter_is_applied_to_every_attempt(caplog: pytest.LogCaptureFixture) -> None:
    limiter = AcquireOnly()
    tpaga, _ = make_client(f"http://127.0.0.1:{closed_port()}/api/", rate_limiter=limiter)
    with pytest.raises(NotSentError):
        charge_once(tpaga)
    assert len(limiter.calls) == 3 == len(retry_warnings(caplog)) + 1


def test_a_local_rate_limiter_spaces_the_charges_without_blocking_the_loop(stub: StubServer) -> None:
    def no_blocking_sleep(seconds: float) -> None:
        raise AssertionError(f"the limiter slept {seconds} s on a thread instead of awaiting")

    limiter = LocalRateLimiter(20, burst=1, sleep=no_blocking_sleep)
    tpaga, _ = make_client(stub.url, rate_limiter=limiter)
    stub.script(*[Reply(201, charge_json()) for _ in range(5)])
    started = time.monotonic()

    async def five() -> list[Charge]:
        return list(await asyncio.gather(*(charge_async(tpaga, f"o-{i}") for i in range(5))))

    assert all(c.approved for c in run(five))
    assert time.monotonic() - started >= 0.18  # 5 requests at 20/s with no burst: the last waits 4 x 50 ms
    assert len(stub.received) == 5


def test_a_limiter_that_cannot_reserve_means_not_sent(stub: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    unavailable = NotSentError(
        "rate limiter unavailable (ConnectionError); the request was not sent",
        operation="rate_limit",
        cause="ConnectionError",
    )
    limiter = AcquireOnly(stub, error=unavailable)
    tpaga, _ = make_client(stub.url, rate_limiter=limiter, retry_attempts=2)
    stub.script(Reply(201, charge_json()))
    with pytest.raises(NotSentError) as caught:
        charge_once(tpaga)
    assert caught.value.cause == "ConnectionError"
    assert stub.received == [] and stub.connections == 0
    assert len(limiter.calls) == 2 and retry_warnings(caplog) == ["tpaga charge attempt 1 failed with NotSentError"]


# --- transport error classification (constructed exceptions) ---------------------------------------------------

KEY = ConnectionKey("api.tpaga.co", 443, True, True, None, None, None)

CLASSIFY: list[tuple[str, BaseException, str]] = [
    ("refused", aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")), "not_sent"),
    ("dns", aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(-2, "Name or service not known")), "not_sent"),
    ("connect timeout", aiohttp.ConnectionTimeoutError("Connection timeout to host"), "not_sent"),
    (
        "tls certificate",
        aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError(1, "certificate verify failed")),
        "not_sent",
    ),
    ("tls handshake", aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "handshake failure")), "not_sent"),
    ("invalid url", aiohttp.InvalidURL("not a url"), "not_sent"),
    ("read timeout", aiohttp.SocketTimeoutError("Timeout on reading data from socket"), "timeout"),
    ("bare timeout", TimeoutError(), "timeout"),
    ("server disconnected", aiohttp.ServerDisconnectedError(), "dropped"),
    ("reset", aiohttp.ClientOSError(104, "Connection reset by peer"), "dropped"),
    ("refused errno but not while connecting", aiohttp.ClientOSError(111, "Connection refused"), "dropped"),
    ("payload", aiohttp.ClientPayloadError("Response payload is not completed"), "dropped"),
    ("bare os error", ConnectionResetError(104, "reset"), "dropped"),
]


@pytest.mark.parametrize(("error", "verdict"), [row[1:] for row in CLASSIFY], ids=[row[0] for row in CLASSIFY])
def test_classify_aiohttp_error(error: BaseException, verdict: str) -> None:
    assert classify_aiohttp_error(error) == (verdict, type(error).__name__)


# --- secrets ------------------------------------------------------------------------------------------------


def _assert_no_secret_in(error: BaseException, *also: str) -> None:
    assert isinstance(error, TpagaError)
    text = "".join(traceback.format_exception(error)) + repr(error) + repr(vars(error))
    for secret in [*SECRETS, *also]:
        assert secret not in text, (type(error).__name__, secret)
    assert error.__cause__ is None
    link: BaseException | None = error.__context__
    while link is not None:  # whatever tenacity left in the context chain, it is our own safe errors
        assert isinstance(link, TpagaError), repr(link)
        assert not any(secret in str(link) for secret in [*SECRETS, *also])
        link = link.__context__


def test_transport_failures_do_not_chain_aiohttp_errors_or_the_url(
    stub: StubServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    refused, _ = make_client(f"http://127.0.0.1:{port}/api/", retry_attempts=2)
    with pytest.raises(NotSentError) as not_sent:
        charge_once(refused)
    # aiohttp's own error says "Cannot connect to host 127.0.0.1:<port>": it must not ride along.
    _assert_no_secret_in(not_sent.value, f"127.0.0.1:{port}", "Cannot connect")

    tpaga, _ = make_client(stub.url, read_timeout_seconds=0.3)
    stub.script(Reply(action="drop"), Reply(action="reset"), Reply(action="hang", seconds=2))
    for reason in ("dropped", "dropped", "timeout"):
        with pytest.raises(OutcomeUnknownError) as unknown:
            charge_once(tpaga)
        assert unknown.value.reason == reason
        _assert_no_secret_in(unknown.value, f"127.0.0.1:{stub.port}", "/api/charge")

    ours = [r for r in caplog.records if r.name.startswith(("billing", "aiohttp"))]
    assert any(r.name == "billing.gateway" and r.levelno == logging.DEBUG for r in ours)
    for record in ours:
        for secret in SECRETS:
            assert secret not in record.getMessage(), (record.name, record.getMessage())


# --- closing sessions -------------------------------------------------------------------------------------------


def _unclosed_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Collect garbage and return the "Unclosed client session/connector" reports aiohttp makes for it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    reports = [str(w.message) for w in caught if "Unclosed" in str(w.message)]
    return reports + [r.getMessage() for r in caplog.records if "Unclosed" in r.getMessage()]


@pytest.fixture
def pool() -> Iterator[GatewayPool]:
    gateway_pool = GatewayPool(4)
    yield gateway_pool
    gateway_pool.shutdown()


def test_close_after_charges_on_a_gateway_pool_closes_the_aiohttp_session(
    stub: StubServer, pool: GatewayPool, sessions: list[aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    tpaga, _ = make_client(stub.url)
    stub.script(*[Reply(201, charge_json()) for _ in range(3)])
    assert [c.approved for c in pool.run(lambda i: charge_async(tpaga, f"o-{i}"), [1, 2, 3])] == [True] * 3
    assert len(sessions) == 1 and not sessions[0].closed
    tpaga.close()  # from this thread, while the pool's loop runs on its own
    assert sessions[0].closed
    sessions.clear()
    assert _unclosed_reports(caplog) == []
    # still usable after close: a new session on the same loop
    stub.script(Reply(201, charge_json()))
    assert pool.run(lambda i: charge_async(tpaga, f"o-{i}"), [4])[0].approved
    assert len(sessions) == 1 and not sessions[0].closed
    tpaga.close()
    assert sessions[0].closed


def test_gateway_pool_shutdown_closes_the_aiohttp_sessions(
    stub: StubServer, sessions: list[aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = make_client(stub.url)
    second, _ = make_client(stub.url)
    stub.script(*[Reply(201, charge_json()) for _ in range(4)])
    gateway_pool = GatewayPool(4)
    results = gateway_pool.run(lambda i: charge_async(first if i % 2 else second, f"o-{i}"), [1, 2, 3, 4])
    assert all(c.approved for c in results)
    assert len(sessions) == 2 and not any(s.closed for s in sessions)
    gateway_pool.shutdown()  # without closing the clients
    assert all(s.closed for s in sessions)
    sessions.clear()
    assert _unclosed_reports(caplog) == []
    first.close()  # closing afterwards is harmless: that loop is gone
    second.close()
    assert _unclosed_reports(caplog) == []


# --- answers and loops a user can meet ------------------------------------------------------------------------


def test_a_compressed_answer_is_read_like_the_threaded_client_reads_it(stub: StubServer, client: TpagaClient) -> None:
    import gzip

    body = gzip.compress(json.dumps(charge_json()).encode())
    stub.script(Reply(201, body, content_type="application/json\r\nContent-Encoding: gzip"))
    assert charge_once(client).approved  # not "malformed": a gzipped approval is an approval
    stub.script(Reply(201, body, content_type="application/json\r\nContent-Encoding: gzip"))
    assert client.charge(card_id=CARD_ID, amount=Decimal(4500), order_id="inv-2-p1").approved


def test_one_client_on_two_loops_at_once_keeps_both_loops_calls(stub: StubServer) -> None:
    """A second loop using the client must not close the first loop's session while its charges are on the wire
    (they would come back 'dropped', i.e. unknown, although Tpaga approved them)."""
    tpaga, _ = make_client(stub.url)
    stub.script(*[Reply(201, charge_json(), seconds=0.5) for _ in range(4)])
    first, second = GatewayPool(4), GatewayPool(4)
    try:
        results: list[Any] = []
        slow = threading.Thread(
            target=lambda: results.extend(first.run(lambda i: charge_async(tpaga, f"a-{i}"), [1, 2]))
        )
        slow.start()
        time.sleep(0.2)  # the first loop's two charges are waiting for their answers
        assert [c.approved for c in second.run(lambda i: charge_async(tpaga, f"b-{i}"), [1, 2])] == [True, True]
        slow.join(5)
        assert [c.approved for c in results] == [True, True]
        assert len(stub.received) == 4
    finally:
        tpaga.close()
        first.shutdown()
        second.shutdown()


def test_aclose_closes_the_session_of_a_loop_that_is_about_to_end(
    stub: StubServer, sessions: list[aiohttp.ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    tpaga, _ = make_client(stub.url)
    stub.script(Reply(201, charge_json()))

    async def main() -> Charge:
        try:
            return await charge_async(tpaga)
        finally:
            await tpaga.aclose()

    assert asyncio.run(main()).approved
    assert len(sessions) == 1 and sessions[0].closed
    sessions.clear()
    assert _unclosed_reports(caplog) == []
    tpaga.close()
