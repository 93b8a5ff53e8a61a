"""`/__sandbox/checkout` over real HTTP, without a browser (tests/test_browser_checkout.py drives one)."""

from __future__ import annotations

import html

import pytest
import requests

from billing.sandbox import SandboxThread
from billing.sandbox.checkout import MAX_RETURN_TO
from billing.sandbox.server import DEFAULT_PUBLIC_KEY

SEED_FIELDS = ("primaryAccountNumber", "cardHolderName", "expirationMonth", "expirationYear", "cvc")


def _get(sandbox: SandboxThread, **params: str) -> requests.Response:
    return requests.get(sandbox.base_url + "__sandbox/checkout", params=params, timeout=10)


def test_the_page_is_the_seeds_form_with_the_current_public_key_and_no_external_resource(sandbox: SandboxThread):
    answer = _get(sandbox, return_to="http://shop.example:8080/signup?plan=gold&x=1")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    page = answer.text
    for field in SEED_FIELDS:
        assert f'name="{field}"' in page and f'for="id_{field}"' in page
    assert f'data-public-key="{DEFAULT_PUBLIC_KEY}"' in page
    assert 'action="http://shop.example:8080/signup?plan=gold&amp;x=1"' in page  # escaped, still the same URL
    assert 'name="tmp_cc_token"' in page
    assert "{{" not in page  # every placeholder filled
    # No CDN, no build: nothing is loaded from anywhere else.
    assert "<script src" not in page and "<link" not in page and "https://" not in page


def test_the_page_follows_a_key_rotation_and_the_emulators_clock(sandbox: SandboxThread):
    requests.post(sandbox.base_url + "__sandbox/keys", json={"publicKey": "pk_rotated_1"}, timeout=10)
    requests.post(sandbox.base_url + "__sandbox/clock", json={"now": "2031-06-01T12:00:00+00:00"}, timeout=10)
    page = _get(sandbox).text
    assert 'data-public-key="pk_rotated_1"' in page
    assert 'data-year="2031"' in page


def test_without_return_to_the_merchant_form_is_hidden(sandbox: SandboxThread):
    page = _get(sandbox).text
    assert 'action="" hidden>' in page


@pytest.mark.parametrize(
    ("return_to", "message"),
    [
        ("javascript:alert(1)", "must be an absolute http:// or https:// URL"),
        ("/signup", "must be an absolute http:// or https:// URL"),
        ("shop.example/signup", "must be an absolute http:// or https:// URL"),
        ("ftp://shop.example/", "must be an absolute http:// or https:// URL"),
        ("http://[::1/x", "return_to is not a URL"),
        ("http://shop.example/" + "a" * MAX_RETURN_TO, f"must be at most {MAX_RETURN_TO} characters"),
    ],
)
def test_an_unusable_return_to_is_refused_with_the_reason(sandbox: SandboxThread, return_to: str, message: str):
    answer = _get(sandbox, return_to=return_to)
    assert answer.status_code == 400
    assert message in html.unescape(answer.text)
    assert "tokenize" not in answer.text  # no form at all: nothing could be posted anywhere
    ledger = requests.get(sandbox.base_url + "__sandbox/ledger", timeout=10).json()
    assert ledger == {"charges": [], "refunds": []}
