"""Sending the stream: signed webhooks (Standard Webhooks) and Celery endpoints.

A webhook request carries `webhook-id` (the event's id: the receiver's dedupe key, the same on every attempt),
`webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per secret
during a rotation), signed by the `standardwebhooks` package. Redirects are not followed, connect and read
times are bounded, and at most `MAX_RESPONSE_BYTES` of a response are read: a slow or hostile receiver costs
one delivery thread a bounded time, never billing (delivery has its own queue and task).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from standardwebhooks import Webhook

from billing.db.models import Endpoint, StreamEvent
from billing.gateway.environment import HttpEnvironment, http_environment
from billing.services import stream
from billing.services.delivery import DeliveryFailed

CONNECT_TIMEOUT_SECONDS = 3.05
READ_TIMEOUT_SECONDS = 10.0
MAX_RESPONSE_BYTES = 4096
USER_AGENT = "billing-webhooks/1"


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
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
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

    def _send_celery(self, endpoint: Endpoint, event: StreamEvent) -> None:
        if self._publish is None:
            raise DeliveryFailed("no broker to publish Celery endpoints on")
        parts = urlsplit(endpoint.url)
        try:
            self._publish(parts.path.lstrip("/"), parts.netloc, {"event": stream.body(event)})
        except Exception as exc:
            raise DeliveryFailed(f"broker refused ({type(exc).__name__})") from None
