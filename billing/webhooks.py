"""Sending the stream: signed webhooks (Standard Webhooks) and Celery endpoints.

A webhook request carries `webhook-id` (the event's id: the receiver's dedupe key, the same on every attempt),
`webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret
during a rotation), signed by the `standardwebhooks` package. Redirects are not followed, connect and read
times are bounded, and at most `MAX_RESPONSE_BYTES` of a response are read: a slow or hostile receiver costs
one delivery thread a bounded time, never billing (delivery has its own queue and task).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from standardwebhooks import Webhook

from billing.clock import SystemClock
from billing.db.models import Endpoint, StreamEvent
from billing.gateway.environment import HttpEnvironment, http_environment
from billing.services import stream
from billing.services.delivery import DeliveryFailed

CONNECT_TIMEOUT_SECONDS = 3.05
READ_TIMEOUT_SECONDS = 10.0
MAX_RESPONSE_BYTES = 4096
_WALL_CLOCK = SystemClock()
USER_AGENT = "billing-webhooks/1"
_loop_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)  # decodes the secret's base64: once per secret, not per request


def signature_headers(secrets: str, event_id: str, body: bytes, when: datetime) -> dict[str, str]:
    """The Standard Webhooks headers for one attempt; `secrets` may hold several, space-separated (rotation)."""
    text = body.decode()
    signatures = " ".join(_signer(secret).sign(event_id, when, text) for secret in secrets.split())
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signatures,
    }


class WebhookSender:
    """Posts events to webhook endpoints (one requests.Session per thread, keep-alive) and publishes them to
    Celery endpoints through `publish(task_name, queue, kwargs)`."""

    def __init__(
        self,
        publish: Callable[[str, str, dict[str, Any]], None] | None = None,
        # Wall time, not the billing clock: receivers reject a webhook-timestamp more than 5 minutes off theirs.
        now: Callable[[], datetime] = _WALL_CLOCK.now,
    ) -> None:
        self._local = threading.local()
        self._publish = publish
        self._now = now
        self._environments: dict[str, HttpEnvironment] = {}

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Proxies and CA bundle are read once per URL (_environment): with trust_env on, requests scans
            # the environment and looks for .netrc on every request (a quarter of a delivery's CPU).
            session.trust_env = False
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
        return session

    def __call__(self, endpoint: Endpoint, event: StreamEvent) -> None:
        if endpoint.kind == "celery":
            self._send_celery(endpoint, event)
        else:
            self._post(endpoint, event)

    def _post(self, endpoint: Endpoint, event: StreamEvent) -> None:
        status = self.post(endpoint, event)
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")

    def _environment(self, url: str) -> HttpEnvironment:
        environment = self._environments.get(url)
        if environment is None:
            environment = self._environments[url] = http_environment(url)
        return environment

    def post(self, endpoint: Endpoint, event: StreamEvent) -> int:
        """One signed POST; the HTTP status (DeliveryFailed when no answer came). `billing webhooks test`
        uses it directly, with an event that is not in the stream."""
        body = stream.encode(event)
        headers = {
            "Content-Type": "application/json",
            **signature_headers(endpoint.secret or "", event.event_id, body, self._now()),
        }
        environment = self._environment(endpoint.url)
        try:
            response = self._session().post(
                endpoint.url,
                proxies=environment.proxies,
                verify=environment.verify(),
                data=body,
                headers=headers,
                timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            raise DeliveryFailed("timeout") from None
        except requests.RequestException as exc:
            raise DeliveryFailed(f"not reached ({type(exc).__name__})") from None
        try:
            # Read a little of the body (a receiver may need it drained to reuse the connection), ignore it.
            response.raw.read(MAX_RESPONSE_BYTES, decode_content=False)
        except (requests.RequestException, OSError, ValueError):
            pass  # the status is the answer; a body cut short changes nothing
        finally:
            response.close()
        return int(response.status_code)

    def send_many(
        self, items: list[tuple[Endpoint, StreamEvent]], concurrency: int
    ) -> Iterator[tuple[int, str | None]]:
        """Send a pass's deliveries: webhooks concurrently (at most `concurrency` in flight) with aiohttp on this
        process's delivery event loop, Celery endpoints by publishing. Yields (index in `items`, None when
        acknowledged or why not) as each outcome comes.

        Why not threads with requests: each synchronous POST cost ~2.2 ms of worker CPU on the benchmark's
        host (requests, urllib3 and http.client in Python, and the interpreter lock handed between the
        threads at every socket call), more than a charge; aiohttp parses HTTP in C on one thread."""
        hooks = []
        for n, (endpoint, event) in enumerate(items):
            if endpoint.kind == "celery":
                try:
                    self._send_celery(endpoint, event)
                except DeliveryFailed as exc:
                    yield n, str(exc)
                else:
                    yield n, None
            else:
                hooks.append(n)
        if not hooks:
            return
        outcomes: queue.SimpleQueue[tuple[int, str | None] | BaseException] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(
            self._post_all([(n, *items[n]) for n in hooks], max(1, concurrency), outcomes), self._loop()
        )
        for _ in hooks:
            outcome = outcomes.get()
            if isinstance(outcome, BaseException):
                raise outcome
            yield outcome
        future.result()

    def _loop(self) -> asyncio.AbstractEventLoop:
        with _loop_lock:
            loop: asyncio.AbstractEventLoop | None = getattr(self, "_aio_loop", None)
            if loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="deliver-loop", daemon=True).start()
                self._aio_loop = loop
            return loop

    async def _post_all(
        self,
        items: list[tuple[int, Endpoint, StreamEvent]],
        concurrency: int,
        outcomes: queue.SimpleQueue[tuple[int, str | None] | BaseException],
    ) -> None:
        import aiohttp

        session: aiohttp.ClientSession | None = getattr(self, "_aio_session", None)
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=READ_TIMEOUT_SECONDS),
                headers={"User-Agent": USER_AGENT},
                trust_env=False,  # proxies are read once per URL (_environment)
            )
            self._aio_session = session
        gate = asyncio.Semaphore(concurrency)

        async def one(endpoint: Endpoint, event: StreamEvent) -> str | None:
            body = stream.encode(event)
            headers = {
                "Content-Type": "application/json",
                **signature_headers(endpoint.secret or "", event.event_id, body, self._now()),
            }
            environment = self._environment(endpoint.url)
            async with gate:
                try:
                    async with session.post(
                        endpoint.url,
                        data=body,
                        headers=headers,
                        allow_redirects=False,
                        proxy=environment.proxy,
                        ssl=environment.ssl_context() if environment.https else True,
                    ) as response:
                        # The status is the answer; a body cut short changes nothing.
                        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError, ValueError):
                            await response.content.read(MAX_RESPONSE_BYTES)
                        status = response.status
                except TimeoutError:
                    return "timeout"
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    return f"not reached ({type(exc).__name__})"
            return None if 200 <= status < 300 else f"HTTP {status}"

        async def report(n: int, endpoint: Endpoint, event: StreamEvent) -> None:
            try:
                outcomes.put((n, await one(endpoint, event)))
            except BaseException as exc:  # the caller waits for one outcome per item: never leave it waiting
                outcomes.put(exc)
                raise

        await asyncio.gather(*(report(n, endpoint, event) for n, endpoint, event in items), return_exceptions=True)

    def _send_celery(self, endpoint: Endpoint, event: StreamEvent) -> None:
        if self._publish is None:
            raise DeliveryFailed("no broker to publish Celery endpoints on")
        parts = urlsplit(endpoint.url)
        try:
            self._publish(parts.path.lstrip("/"), parts.netloc, {"event": stream.body(event)})
        except Exception as exc:
            raise DeliveryFailed(f"broker refused ({type(exc).__name__})") from None
