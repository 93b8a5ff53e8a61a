"""How the client is wired for speed: its sessions read the environment once and send the transport's requests
straight to the adapter, with the same request on the wire, the same cookies and the same errors as requests'
full path."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from billing.gateway.client import _DirectSession, _environment_snapshot_session
from billing.gateway.transport import BasicKeyAuth, default_session


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
    # exactly how billing.gateway.transport.Transport.send calls its session
    return session.request(
        "POST",
        url,
        data=b'{"amount":4500}',
        headers={"Accept": "application/json", "User-Agent": "tpaga-billing/x", "Content-Type": "application/json"},
        auth=BasicKeyAuth("k"),
        timeout=(3.05, 20),
        allow_redirects=False,
    )


def test_the_direct_session_sends_what_requests_full_path_sends(server: str) -> None:
    full = default_session()
    full.trust_env = False
    direct = _environment_snapshot_session(server + "/")()
    assert isinstance(direct, _DirectSession)
    answers = [_call(full, server + "/a"), _call(direct, server + "/a")]
    assert [(a.status_code, a.content, a.headers["Content-Type"]) for a in answers] == [
        (201, b'{"ok": true}', "application/json")
    ] * 2
    sent = [(r["path"], r["headers"], r["body"]) for r in Recorder.seen]
    assert sent[0] == sent[1]
    assert sent[0][1]["Authorization"] == "Basic azo="


def test_the_direct_session_keeps_and_returns_cookies_like_a_session(server: str) -> None:
    direct = _environment_snapshot_session(server + "/")()
    _call(direct, server + "/set")
    _call(direct, server + "/next")
    assert "Cookie" not in Recorder.seen[0]["headers"]
    assert Recorder.seen[1]["headers"]["Cookie"] == "lb=node-7"


def test_the_direct_session_raises_what_requests_raises() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"  # nothing listens here
    errors = []
    for session in (default_session(), _environment_snapshot_session(url)()):
        with pytest.raises(requests.ConnectionError) as caught:
            _call(session, url)
        errors.append(type(caught.value))
    assert errors[0] is errors[1]


def test_other_calls_take_requests_full_path(server: str) -> None:
    direct = _environment_snapshot_session(server + "/")()
    answer = direct.request("POST", server + "/j", json={"a": 1}, allow_redirects=False)
    assert answer.status_code == 201
    assert Recorder.seen[0]["body"] == b'{"a": 1}'
