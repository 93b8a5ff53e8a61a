"""A loopback API URL is never proxied (defect 12, proxy part): the loopback exemption allows plain http, so a
proxy would receive the private key in clear text. A real forwarding proxy on 127.0.0.1 records what reaches
it; with HTTP_PROXY and HTTPS_PROXY pointing at it, calls to the emulator on loopback work and it sees nothing,
on both transports. A remote API URL still goes through the proxy the environment names."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest

from billing.gateway import TpagaClient
from billing.gateway.aio import close_transports
from billing.gateway.environment import http_environment
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class RecordingProxy(http.server.BaseHTTPRequestHandler):
    """A plain-http forwarding proxy that keeps every request line and header it was given."""

    seen: list[tuple[str, str, dict[str, str]]] = []

    def _forward(self) -> None:
        RecordingProxy.seen.append((self.command, self.path, dict(self.headers.items())))
        target = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        upstream = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers)
        answer = upstream.getresponse()
        payload = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        upstream.close()

    do_GET = do_POST = _forward

    def do_CONNECT(self) -> None:
        RecordingProxy.seen.append((self.command, self.path, dict(self.headers.items())))
        self.send_error(403)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    RecordingProxy.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingProxy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", url)
    monkeypatch.setenv("HTTPS_PROXY", url)
    yield url
    httpd.shutdown()
    httpd.server_close()


def test_the_proxy_works_for_a_plain_client(sandbox: SandboxThread, proxy: str) -> None:
    # The proxy itself is sound: what the client must avoid would work, and would reach it.
    import requests

    answer = requests.get(sandbox.base_url + "__sandbox/stats", timeout=10)
    assert answer.status_code == 200
    assert [(method, path) for method, path, _ in RecordingProxy.seen] == [
        ("GET", sandbox.base_url + "__sandbox/stats")
    ]


def test_sync_calls_to_a_loopback_api_bypass_the_proxy(sandbox: SandboxThread, proxy: str) -> None:
    with TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY) as client:
        customer = client.create_customer(email="proxy@example.com")
        token = client.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="P")
        card = client.associate_card(customer.id, token)
        assert client.charge(card_id=card.id, amount=Decimal(4500), order_id="px-sync").approved
    assert RecordingProxy.seen == []


def test_async_charges_to_a_loopback_api_bypass_the_proxy(sandbox: SandboxThread, proxy: str) -> None:
    with TpagaClient(sandbox.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY) as client:
        customer = client.create_customer(email="proxy@example.com")
        token = client.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="P")
        card = client.associate_card(customer.id, token)
        RecordingProxy.seen = []

        async def one() -> bool:
            try:
                charge = await client.charge_async(card_id=card.id, amount=Decimal(4500), order_id="px-async")
                return charge.approved
            finally:
                await close_transports()

        assert asyncio.run(one())
    assert RecordingProxy.seen == []


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("http://127.0.0.1:8090/api/", {}),
        ("http://localhost:8090/api/", {}),
        ("http://[::1]:8090/api/", {}),
        ("http://127.3.4.5/api/", {}),
        ("https://127.0.0.1:8443/api/", {}),
        ("https://api.tpaga.co/api/", "proxied"),
    ],
)
def test_only_a_remote_api_url_is_proxied(proxy: str, api_url: str, expected: object) -> None:
    environment = http_environment(api_url)
    if expected == "proxied":
        assert environment.proxies["https"] == proxy and environment.proxy == proxy
    else:
        assert environment.proxies == expected and environment.proxy is None


def test_no_proxy_still_exempts_a_remote_host(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "api.tpaga.co")
    assert http_environment("https://api.tpaga.co/api/").proxy is None
