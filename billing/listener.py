"""A local webhook receiver for integrators (`billing webhooks listen`, and the demo's receiver).

It verifies each request's Standard Webhooks signature with the endpoint's secret(s), answers 2xx to a verified
event and 400 to anything else, and reports each request to `on_request`. With `forward`, a verified event is
passed on unchanged (body and `webhook-*` headers, so the app verifies it too) and the app's status becomes the
answer: an app that fails makes the stream retry, as it would in production.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

MAX_BODY_BYTES = 1 << 20
FORWARD_TIMEOUT = (3.05, 10.0)
SEEN_IDS_KEPT = 100_000
_FORWARDED_HEADERS = ("content-type", "webhook-id", "webhook-timestamp", "webhook-signature")


@dataclass(frozen=True)
class Heard:
    """One request: a verified event (`body` set) or a rejected request (`reason` set)."""

    webhook_id: str
    status: int
    body: dict[str, Any] | None = None
    reason: str | None = None
    again: bool = False  # this webhook-id was heard before (a retry or a replay)
    forwarded: str | None = None  # what the forward target answered

    @property
    def verified(self) -> bool:
        return self.body is not None


def describe(body: dict[str, Any]) -> str:
    """An event body on one line: offset, type, subscription and its seq, the ids and amounts an app acts on."""
    parts = [f"#{body.get('offset')}", str(body.get("type"))]
    if body.get("subscription_id") is not None:
        parts.append(f"sub {body['subscription_id']} seq {body.get('subscription_seq')}")
    data = body.get("data") or {}
    for key in ("customer_id", "invoice_id", "refund_id", "amount", "currency", "error_code"):
        if data.get(key) is not None and not (key == "customer_id" and "subscription_id" in body):
            parts.append(f"{key}={data[key]}")
    parts.append(str(body.get("id")))
    return "  ".join(parts)


def summary(heard: Heard) -> str:
    """One line per request for a person reading along: the answer given, then the event."""
    if heard.body is None:
        return f"{heard.status} REJECTED webhook-id={heard.webhook_id or '-'}: {heard.reason}"
    parts = [str(heard.status), describe(heard.body)]
    if heard.again:
        parts.append("(again)")
    if heard.forwarded is not None:
        parts.append(f"-> forwarded: {heard.forwarded}")
    return "  ".join(parts)


class Listener:
    """`start()` binds (OSError if the port is taken) and serves on a daemon thread; `stop()` ends it."""

    def __init__(
        self,
        secrets: Sequence[str],
        on_request: Callable[[Heard], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        forward: str | None = None,
    ) -> None:
        self._webhooks = [Webhook(secret) for secret in secrets]
        self._on_request = on_request
        self._forward = forward
        self._address = (host, port)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self._address[0]}:{self._server.server_address[1]}/"

    def start(self) -> Listener:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the sender reuses its connection

            def log_message(self, *_: Any) -> None:
                return None

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self.close_connection = True
                    self._answer(413 if length > 0 else 400)
                    return
                raw = self.rfile.read(length)
                self._answer(listener._handle(raw, {k.lower(): v for k, v in self.headers.items()}))

            def _refuse(self) -> None:
                self.close_connection = True
                self._answer(405)

            do_GET = do_PUT = do_DELETE = do_PATCH = _refuse

            def _answer(self, status: int) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up and went away
                    pass

        self._server = ThreadingHTTPServer(self._address, Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="billing-listener", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _verify(self, raw: bytes, headers: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
        reason = "no matching signature"
        for webhook in self._webhooks:
            try:
                body = webhook.verify(raw, headers)
            except WebhookVerificationError as exc:
                reason = str(exc) or reason
                continue
            except ValueError:  # a malformed signature header or body (the package raises these as they come)
                return None, "malformed webhook-signature header or body"
            if isinstance(body, dict):
                return body, ""
            return None, "the signed body is not a JSON object"
        return None, reason

    def _handle(self, raw: bytes, headers: dict[str, str]) -> int:
        webhook_id = headers.get("webhook-id", "")[:64]
        body, reason = self._verify(raw, headers)
        if body is None:
            self._on_request(Heard(webhook_id, 400, reason=reason))
            return 400
        with self._lock:
            again = webhook_id in self._seen
            self._seen[webhook_id] = None
            if len(self._seen) > SEEN_IDS_KEPT:
                self._seen.popitem(last=False)
        status, forwarded = 200, None
        if self._forward is not None:
            status, forwarded = self._pass_on(raw, headers)
        self._on_request(Heard(webhook_id, status, body=body, again=again, forwarded=forwarded))
        return status

    def _pass_on(self, raw: bytes, headers: dict[str, str]) -> tuple[int, str]:
        assert self._forward is not None
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            with session.post(
                self._forward,
                data=raw,
                headers={k: headers[k] for k in _FORWARDED_HEADERS if k in headers},
                timeout=FORWARD_TIMEOUT,
                allow_redirects=False,
                stream=True,  # the app's answer body is not read
            ) as response:
                return response.status_code, f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            # 502: the event stays pending at the sender and is retried, as if the app itself were down.
            return 502, f"not reached ({type(exc).__name__})"
