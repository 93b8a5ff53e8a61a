"""A real HTTP webhook receiver for tests: verifies every Standard Webhooks signature, records what arrived, and
misbehaves on request (answers 500 to chosen first deliveries, sleeps past the sender's read timeout)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    body: dict[str, Any]
    verified: bool
    status: int
    # Arrival order (0, 1, 2 ...) and the how-manieth request for this webhook-id, both counted when the request
    # came in: `received` is in order of the answers, which a slow answer puts late.
    arrival: int = 0
    attempt: int = 1


@dataclass
class Receiver:
    """Start with `start()`; `url` is where to point an endpoint. `decide(body, attempt)` returns the status to
    answer (and may sleep); by default 200."""

    secret: str
    decide: Callable[[dict[str, Any], int], int] | None = None
    received: list[Received] = field(default_factory=list)
    bad_signatures: int = 0
    _arrivals: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        _host, port = self._server.server_address[:2]
        return f"http://127.0.0.1:{port}/hooks"

    def start(self) -> Receiver:
        receiver = self
        webhook = Webhook(self.secret)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                return None

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()}
                try:
                    body = webhook.verify(raw, headers)
                    verified = True
                except (WebhookVerificationError, ValueError):  # ValueError: a malformed signature header
                    body, verified = json.loads(raw or b"{}"), False
                webhook_id = str(headers.get("webhook-id"))
                with receiver._lock:
                    arrival = sum(receiver._arrivals.values())
                    receiver._arrivals[webhook_id] += 1
                    attempt = receiver._arrivals[webhook_id]
                status = 200 if receiver.decide is None else receiver.decide(body, attempt)
                if not verified:
                    status = 400
                with receiver._lock:
                    receiver.received.append(Received(webhook_id, body, verified, status, arrival, attempt))
                    if not verified:
                        receiver.bad_signatures += 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the sender timed out and went away
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def arrived(self) -> int:
        """How many requests have come in so far (answered or not)."""
        with self._lock:
            return sum(self._arrivals.values())

    def acknowledged(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def wait_for(self, count: int, timeout_seconds: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            done = self.acknowledged()
            if len(done) >= count:
                return done
            time.sleep(0.05)
        raise AssertionError(f"{len(self.acknowledged())} of {count} events acknowledged in {timeout_seconds} s")
