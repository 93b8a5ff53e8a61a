"""The batch path's HTTP transport: aiohttp on one event loop, many requests in flight on one thread.

Why a second transport: the threaded `requests` stack costs several times more client CPU per request
(`requests` -> `urllib3` -> `http.client` in Python, and the interpreter lock handed between hundreds of gateway
threads on every socket call); aiohttp parses HTTP in C and keeps every request of a process on one thread
(PERFORMANCE.md has the measurements). The sync stack stays for the single calls, which run on worker threads.

The contract is `transport.Transport`'s, so the requestor, its retry rule and its answer mapping do not change:
`send` returns the fully read answer or raises `NotSentError` (provably never left: refused, unreachable, DNS,
TLS handshake, connect timeout, bad URL) or `OutcomeUnknownError` (`timeout`: no byte within the read timeout;
`dropped`: the connection broke after the request may have been written). aiohttp never resends a POST on its
own (it retries only idempotent methods on a reused connection that turned out closed), so a charge that may
have reached Tpaga is never sent twice by the transport.

Proxies and TLS: `environment.http_environment`, read once when the transport is made (a loopback URL is never
proxied; aiohttp's `trust_env` stays off, so `.netrc` is never read).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import aiohttp

from billing.gateway.environment import HttpEnvironment, http_environment
from billing.gateway.errors import TpagaError
from billing.gateway.operations import Operation
from billing.gateway.transport import (
    USER_AGENT,
    BasicKeyAuth,
    RawResponse,
    Verdict,
    charset_of,
    checked_api_url,
    log_exchange,
    transport_failure,
)

logger = logging.getLogger("billing.gateway")

_NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, unreachable, DNS, proxy unreachable, TLS handshake and certificate
    aiohttp.ConnectionTimeoutError,  # no connection within the connect timeout
    aiohttp.ClientHttpProxyError,  # the proxy refused the tunnel: nothing reached Tpaga
    aiohttp.InvalidURL,
)


def classify_aiohttp_error(error: BaseException) -> tuple[Verdict, str]:
    """Like `transport.classify_transport_error`, for aiohttp's exceptions."""
    name = type(error).__name__
    if isinstance(error, _NOT_SENT):
        return "not_sent", name
    if isinstance(error, TimeoutError):  # aiohttp's read timeout (SocketTimeoutError) is one
        return "timeout", name
    return "dropped", name


# Every transport with an open session, to close them when a loop stops (GatewayPool.shutdown).
_OPEN: weakref.WeakSet[AsyncTransport] = weakref.WeakSet()


async def close_transports() -> None:
    """Close the aiohttp sessions that were opened on the running loop."""
    loop = asyncio.get_running_loop()
    for transport in list(_OPEN):
        if transport.loop is loop:
            await transport.close()


class AsyncTransport:
    """One aiohttp session for the event loop it is first used on. Not thread-safe: use it from that loop."""

    def __init__(
        self,
        api_url: str,
        *,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
        environment: HttpEnvironment | None = None,
    ) -> None:
        if connect_timeout_seconds <= 0 or read_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        self.api_url = checked_api_url(api_url)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout_seconds, sock_read=read_timeout_seconds
        )
        environment = environment or http_environment(self.api_url)
        self._proxy = environment.proxy
        self._ssl = environment.ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"AsyncTransport(api_url={self.api_url!r})"

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection limit of its own: the GatewayPool's slots bound the calls in flight.
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
            self.loop = asyncio.get_running_loop()
            _OPEN.add(self)
        return self._session

    async def send(
        self, operation: Operation[Any], path: str, *, auth: BasicKeyAuth, body: bytes | None = None
    ) -> RawResponse:
        """One HTTP exchange, with no retry. `path` is relative to the API URL and already quoted."""
        headers = {"Authorization": auth.header}
        if body is not None:
            headers["Content-Type"] = "application/json"
        session = self._client_session()
        started = time.monotonic()
        failure: TpagaError | None = None
        result: RawResponse | None = None
        try:
            async with session.request(
                operation.method,
                self.api_url + path,
                data=body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as response:
                result = RawResponse(
                    response.status, await response.read(), charset_of(response.headers.get("Content-Type"))
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            failure = self._failure(operation, exc)
        # Raised outside the except block: aiohttp's errors name the URL, whose path can hold a card id.
        return log_exchange(operation, started, result, failure)

    @staticmethod
    def _failure(operation: Operation[Any], error: BaseException) -> TpagaError:
        verdict, cause = classify_aiohttp_error(error)
        return transport_failure(operation, verdict, cause)

    async def close(self) -> None:
        _OPEN.discard(self)
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
