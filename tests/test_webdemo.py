"""`billing demo --web`'s merchant site over real HTTP, with a recording Shop in place of Celery and the database.

The whole flow with a real worker and a real browser is tests/test_browser_checkout.py.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import click
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from billing.webdemo import BadSignup, Merchant, Signup, parse_signup, render_state, request_ids, run_web_demo

GOOD = {"tmp_cc_token": "87we9uv06vv7jyjq", "email": "ana@example.com", "firstName": "Ana", "lastName": "Gómez"}


class RecordingShop:
    def __init__(self) -> None:
        self.signups: list[Signup] = []

    def sign_up(self, signup: Signup) -> str:
        self.signups.append(signup)
        return "sub_00000000000" + str(len(self.signups))

    def state(self, external_id: str) -> dict[str, Any]:
        return {
            "external_id": external_id,
            "subscription": None,
            "invoices": [],
            "commands": [{"command": "customer", "status": "waiting", "error": None}],
            "settled": False,
        }


def _run(check: Callable[[str, ClientSession, Merchant], Awaitable[None]]) -> RecordingShop:
    shop = RecordingShop()
    merchant = Merchant("http://127.0.0.1:9/__sandbox/checkout", shop)

    async def main() -> None:
        async with TestServer(merchant.app(), host="127.0.0.1") as server, ClientSession() as http:
            await check(str(server.make_url("")), http, merchant)

    asyncio.run(main())
    return shop


def test_the_shop_sends_the_browser_to_the_checkout_with_its_own_signup_url():
    async def check(base: str, http: ClientSession, _m: Merchant) -> None:
        async with http.get(base + "/", allow_redirects=False) as answer:
            assert answer.status == 302
            location = answer.headers["Location"]
        where, _, query = location.partition("?")
        assert where == "http://127.0.0.1:9/__sandbox/checkout"
        assert parse_qs(query) == {"return_to": [base + "/signup"]}

    _run(check)


def test_a_signup_is_sent_and_the_browser_lands_on_its_subscription_page():
    async def check(base: str, http: ClientSession, merchant: Merchant) -> None:
        async with http.post(base + "/signup", data=GOOD, allow_redirects=False) as answer:
            assert answer.status == 303
            assert answer.headers["Location"] == "/subscriptions/sub_000000000001"
        async with http.get(base + "/subscriptions/sub_000000000001") as answer:
            assert answer.status == 200
            page = await answer.text()
        assert "waiting for the worker" in page and 'http-equiv="refresh"' in page  # refreshes until settled
        async with http.get(base + "/api/subscriptions/sub_000000000001") as answer:
            assert (await answer.json())["settled"] is False

    shop = _run(check)
    assert shop.signups == [Signup("87we9uv06vv7jyjq", "ana@example.com", "Ana", "Gómez")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tmp_cc_token": ""}, "tmp_cc_token is missing"),
        ({"tmp_cc_token": "a b<script>"}, "tmp_cc_token is not a Tpaga token"),
        ({"tmp_cc_token": "x" * 129}, "tmp_cc_token is not a Tpaga token"),
        ({"email": "ana"}, "email must be an address"),
        ({"email": "@example.com"}, "email must be an address"),
        ({"email": "ana @example.com"}, "email must be an address"),
        ({"email": "a" * 250 + "@example.com"}, "email must be an address"),
        ({"firstName": "   "}, "firstName must be 1 to 64 characters"),
        ({"lastName": "x" * 65}, "lastName must be 1 to 64 characters"),
    ],
)
def test_a_bad_signup_is_refused_with_the_reason_and_nothing_is_sent(change: dict[str, str], message: str):
    async def check(base: str, http: ClientSession, merchant: Merchant) -> None:
        async with http.post(base + "/signup", data={**GOOD, **change}, allow_redirects=False) as answer:
            assert answer.status == 400
            text = await answer.text()
        assert message in text and "Nothing was sent to billing." in text
        assert "<script>" not in text
        assert merchant.known == set()

    assert _run(check).signups == []


def test_a_missing_field_is_refused_like_an_empty_one():
    with pytest.raises(BadSignup, match="lastName must be"):
        parse_signup({k: v for k, v in GOOD.items() if k != "lastName"})
    assert parse_signup({**GOOD, "firstName": "  Ana   María "}).first_name == "Ana María"


@pytest.mark.parametrize("external_id", ["sub_000000000009", "../etc", "sub_000000000001.json"])
def test_a_subscription_this_shop_did_not_sign_up_is_a_404(external_id: str):
    async def check(base: str, http: ClientSession, _m: Merchant) -> None:
        async with http.post(base + "/signup", data=GOOD, allow_redirects=False):
            pass
        for prefix in ("/subscriptions/", "/api/subscriptions/"):
            async with http.get(base + prefix + external_id) as answer:
                assert answer.status == 404

    _run(check)


def test_the_state_page_shows_outcomes_escaped_and_stops_refreshing_once_settled():
    state = {
        "external_id": "sub_0123456789ab",
        "subscription": {
            "status": "active",
            "plan": {"code": "web-monthly", "amount": "45000.00", "currency": "COP", "every": "1 month"},
        },
        "invoices": [
            {
                "period_index": 0,
                "amount": "45000.00",
                "currency": "COP",
                "state": "open",
                "attempts": [{"number": 1, "state": "declined", "error_code": "51"}],
            }
        ],
        "commands": [{"command": "card", "status": "rejected", "error": "token <used>"}],
        "settled": True,
    }
    page = render_state(state)
    assert "<strong>active</strong>" in page and "1 declined 51" in page
    assert "token &lt;used&gt;" in page
    assert "Refreshing" not in page


def test_request_ids_follow_the_subscription_key():
    assert request_ids("sub_0123456789ab") == {
        "customer": "signup-0123456789ab-customer",
        "card": "signup-0123456789ab-card",
        "subscription": "signup-0123456789ab-subscription",
    }


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_a_port_in_use_or_a_bad_host_stops_the_web_demo_before_it_starts_anything(
    host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(click.ClickException, match=f"cannot listen on {host}:{port}: "):
            run_web_demo(host, port, echo=pytest.fail)
    assert list(tmp_path.iterdir()) == [tmp_path / "temp"]  # no demo-logs/
    assert list((tmp_path / "temp").iterdir()) == []  # no state directory
