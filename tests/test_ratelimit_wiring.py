"""How the transport is wired for speed: it reads the environment once and sends through requests' prepared-request
API, with the same request on the wire, the same cookies and the same errors as requests' full path."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from billing.gateway.operations import CHARGE
from billing.gateway.transport import USER_AGENT, BasicKeyAuth, RawResponse, Transport, default_session


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Recorder.seen.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        if self.path == "/set":
            self.send_header("Set-Cookie", "lb=node-7; Path=/")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    Recorder.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _call(session: requests.Session, url: str) -> requests.Response:
    # requests' full path, with the headers the transport sends
    return session.request(
        "POST",
        url,
        data=b'{"amount":4500}',
        headers={"Accept": "application/json", "User-Agent": USER_AGENT, "Content-Type": "application/json"},
        auth=BasicKeyAuth("k"),
        timeout=(3.05, 20),
        allow_redirects=False,
    )


def _send(transport: Transport, path: str) -> RawResponse:
    return transport.send(CHARGE, path, auth=BasicKeyAuth("k"), body=b'{"amount":4500}')


def _transport(server: str) -> Transport:
    return Transport(server + "/", connect_timeout_seconds=3.05, read_timeout_seconds=20)


def test_the_transport_sends_what_requests_full_path_sends(server: str) -> None:
    full = default_session()
    answer = _call(full, server + "/a")
    raw = _send(_transport(server), "a")
    assert (answer.status_code, answer.content) == (raw.status, raw.body) == (201, b'{"ok": true}')
    sent = [(r["path"], r["headers"], r["body"]) for r in Recorder.seen]
    assert sent[0] == sent[1]
    assert sent[0][1]["Authorization"] == "Basic azo="


def test_the_transport_keeps_and_returns_cookies_like_a_session(server: str) -> None:
    transport = _transport(server)
    _send(transport, "set")
    _send(transport, "next")
    assert "Cookie" not in Recorder.seen[0]["headers"]
    assert Recorder.seen[1]["headers"]["Cookie"] == "lb=node-7"


def test_the_default_session_does_not_read_the_environment_per_request() -> None:
    assert default_session().trust_env is False
