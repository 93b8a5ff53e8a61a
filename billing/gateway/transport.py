"""HTTP transport to Tpaga: one keep-alive `requests.Session` per thread, explicit timeouts, no hidden retries,
and a precise line between "the request never left" and "it may have reached Tpaga".

Logging: this module logs the operation name, status and elapsed time only. urllib3's own DEBUG logger
(`urllib3.connectionpool`) logs request paths, and `GET customer/{id}/credit_card/{card_id}` carries a card id
in its path: keep urllib3 at INFO or above in production (the key and bodies are never logged by it).

Keep-alive: before reusing a pooled connection urllib3 checks whether the server already closed it, and opens a
new one if so. A server that closes an idle connection at the very moment a request is written on it still
makes that request look dropped; for a charge that is an (honest) unknown outcome, never a silent resend.

Timeouts: `read_timeout_seconds` bounds each wait for bytes, not the whole answer; the retry budget
(`retry_max_seconds`) bounds when another attempt may start, not an attempt in flight.

Environment: proxies and the CA bundle come from `environment.http_environment`, read once per transport and
passed with every request (never proxying a loopback URL); the sessions do not consult the environment.
Requests go out through requests' prepared-request API (`Session.prepare_request` + `Session.send`), which
keeps the session's headers, cookies and adapters but skips `Session.request`'s per-call settings merge.
"""

from __future__ import annotations

import base64
import http.client
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from billing import __version__
from billing.config import ConfigError, validate_api_url
from billing.gateway.environment import HttpEnvironment, http_environment
from billing.gateway.errors import NotSentError, OutcomeUnknownError, TpagaError
from billing.gateway.operations import Operation

logger = logging.getLogger("billing.gateway")

USER_AGENT = f"tpaga-billing/{__version__}"

# Each thread owns its session and makes one request at a time, so a thread's pool needs few sockets; the
# spare capacity only matters if a caller hands one session to several threads through session_factory.
POOL_CONNECTIONS = 4
POOL_MAXSIZE = 64


def default_session() -> requests.Session:
    """A session with keep-alive pools and no transport-level retries.

    max_retries=0 matters: urllib3 must never resend a request on its own (for a charge POST on a connection
    that turned out stale, a silent resend could charge twice). All retries go through retry.should_retry.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=POOL_CONNECTIONS, pool_maxsize=POOL_MAXSIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False  # the transport passes the environment's proxies and CA bundle itself
    return session


def checked_api_url(url: str) -> str:
    """The base URL with a trailing slash: https unless loopback, and no credentials, query or fragment."""
    parsed = urlparse(url)
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError("TPAGA_API_URL must not contain credentials; keys are configured separately")
    if parsed.query or parsed.fragment:
        raise ConfigError("TPAGA_API_URL must not contain a query string or fragment")
    return validate_api_url(url)


class BasicKeyAuth(AuthBase):
    """HTTP Basic with the API key as user name and an empty password, encoded once; never shown in a repr."""

    __slots__ = ("_header",)

    def __init__(self, key: str) -> None:
        self._header = "Basic " + base64.b64encode(f"{key}:".encode()).decode("ascii")

    @property
    def header(self) -> str:
        """The Authorization header's value."""
        return self._header

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "BasicKeyAuth(***)"


@dataclass(frozen=True)
class RawResponse:
    """Status and body of an HTTP answer, fully read, with the charset its Content-Type named (if any)."""

    status: int
    body: bytes
    charset: str | None = None

    @property
    def payload(self) -> bytes | str:
        """The body as text when a charset was named (Tpaga may send any), else the raw bytes for JSON."""
        if self.charset is None:
            return self.body
        try:
            return self.body.decode(self.charset)
        except (LookupError, UnicodeDecodeError):
            return self.body  # let the JSON decoder judge it: unreadable means malformed


def charset_of(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type header, if any."""
    if not content_type:
        return None
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"').strip("'")
    return None


Verdict = Literal["not_sent", "timeout", "dropped"]

_NOT_SENT_MARKERS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.NewConnectionError,  # refused, unreachable, DNS (NameResolutionError is a subclass)
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.LocationParseError,
    socket.gaierror,
    ConnectionRefusedError,
    ssl.SSLCertVerificationError,  # the TLS handshake failed: no request byte was written
)
_NOT_SENT_REQUESTS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectTimeout,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: explicit causes, urllib3's `reason` and exceptions passed as args.

    Implicit `__context__` is not followed: an exception merely handled earlier says nothing about this one.
    """
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: list[Any] = [current.__cause__, getattr(current, "reason", None), *current.args]
        stack.extend(item for item in linked if isinstance(item, BaseException))


def classify_transport_error(error: BaseException) -> tuple[Verdict, str]:
    """Whether a transport failure provably never sent the request, timed out, or dropped after sending;
    with the name of the innermost error that decided it (for messages; never the URL)."""
    if isinstance(error, _NOT_SENT_REQUESTS):
        return "not_sent", type(error).__name__
    chain = list(_causes(error))
    if isinstance(error, requests.exceptions.ReadTimeout):
        return "timeout", type(error).__name__
    for link in chain:
        if isinstance(link, _NOT_SENT_MARKERS):
            return "not_sent", type(link).__name__
    for link in chain:
        if isinstance(link, urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return "timeout", type(link).__name__
    innermost = chain[-1] if chain else error
    return "dropped", type(innermost).__name__


def transport_failure(operation: Operation[Any], verdict: Verdict, cause: str) -> TpagaError:
    """The client error for a transport failure: NotSentError, or OutcomeUnknownError with the verdict."""
    name = operation.name
    if verdict == "not_sent":
        return NotSentError(f"{name}: the request was not sent ({cause})", operation=name, cause=cause)
    detail = "no answer within the read timeout" if verdict == "timeout" else "the connection broke"
    return OutcomeUnknownError(
        f"{name}: outcome unknown ({verdict}): {detail} after the request may have been sent ({cause})",
        reason=verdict,
        operation=name,
        cause=cause,
    )


def log_exchange(
    operation: Operation[Any], started: float, result: RawResponse | None, failure: TpagaError | None
) -> RawResponse:
    """Log one exchange at DEBUG (operation, status or error class, milliseconds: never the URL, ids or body),
    then return its answer or raise its failure."""
    elapsed_ms = (time.monotonic() - started) * 1000
    if failure is not None:
        logger.debug("tpaga %s failed after %.0f ms: %s", operation.name, elapsed_ms, type(failure).__name__)
        raise failure
    assert result is not None
    logger.debug("tpaga %s answered HTTP %d in %.0f ms", operation.name, result.status, elapsed_ms)
    return result


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class Transport:
    """Sends one request and returns its fully read answer, or raises NotSentError / OutcomeUnknownError."""

    def __init__(
        self,
        api_url: str,
        *,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
        session_factory: Callable[[], requests.Session] | None = None,
        environment: HttpEnvironment | None = None,
    ) -> None:
        if connect_timeout_seconds <= 0 or read_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        self.api_url = checked_api_url(api_url)
        self.connect_timeout_seconds = connect_timeout_seconds
        self.read_timeout_seconds = read_timeout_seconds
        self.environment = environment or http_environment(self.api_url)
        self._timeout = (connect_timeout_seconds, read_timeout_seconds)
        self._verify = self.environment.verify()
        self._session_factory = session_factory or default_session
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._generation = 0

    def __repr__(self) -> str:
        return f"Transport(api_url={self.api_url!r})"

    def _session(self) -> requests.Session:
        """This thread's session; a new one after close() or in a forked child (sockets are not shared)."""
        state: tuple[int, int, requests.Session] | None = getattr(self._local, "state", None)
        pid = os.getpid()
        if state is not None and state[0] == self._generation and state[1] == pid:
            return state[2]
        session = self._session_factory()
        with self._lock:
            self._sessions.add(session)
            generation = self._generation
        self._local.state = (generation, pid, session)
        return session

    def send(
        self, operation: Operation[Any], path: str, *, auth: BasicKeyAuth, body: bytes | None = None
    ) -> RawResponse:
        """One HTTP exchange, with no retry. `path` is relative to the API URL and already quoted."""
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/json"
        session = self._session()
        started = time.monotonic()
        failure: TpagaError | None = None
        result: RawResponse | None = None
        try:
            prepared = session.prepare_request(
                requests.Request(operation.method, self.api_url + path, data=body, headers=headers, auth=auth)
            )
            response = session.send(
                prepared,
                timeout=self._timeout,
                allow_redirects=False,
                proxies=self.environment.proxies,
                verify=self._verify,
            )
            result = RawResponse(
                response.status_code, response.content, charset_of(response.headers.get("Content-Type"))
            )
        except TRANSPORT_ERRORS as exc:
            failure = self._failure(operation, exc)
        # Raised outside the except block on purpose: requests' exceptions carry the URL, whose path can hold
        # a card id, so they must not ride along as __context__ into logged tracebacks.
        return log_exchange(operation, started, result, failure)

    @staticmethod
    def _failure(operation: Operation[Any], error: BaseException) -> TpagaError:
        return transport_failure(operation, *classify_transport_error(error))

    def close(self) -> None:
        """Close every thread's session; later calls open new ones."""
        with self._lock:
            sessions = list(self._sessions)
            self._sessions = weakref.WeakSet()
            self._generation += 1
        for session in sessions:
            session.close()
