"""The seed's browser flow in a real browser: Playwright driving Debian's chromium (never a downloaded build).

Case 1 runs `billing demo --web` as a user would (emulator, shop, real celery worker and beat), fills the
emulator's checkout with an approving test card and checks the emulator's ledger: the card is associated to the
customer the form named, and charged. Case 2 types an expired card and checks the per-field error; case 3 the
seed's 401 message after the public key was rotated. One browser for the module; marked `browser` where a
browser is driven and `celery` where the demo's worker runs (the last case, a SIGTERM while it starts, needs no
browser).

BILLING_CHECKOUT_SCREENSHOT=docs/checkout.png saves the filled form there (docs/checkout.md); otherwise it goes
to the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from billing.sandbox import SandboxThread
from billing.sandbox.server import DEFAULT_PRIVATE_KEY
from tests.conftest import service_missing

CHROMIUM = os.environ.get("BILLING_TEST_CHROMIUM", "/usr/bin/chromium")
READY_TIMEOUT_SECONDS = 120
# How long the browser waits for a page to change: a generous ceiling on a loaded machine, not a speed check.
WAIT_MS = 60_000
CUSTOMER = {"email": "ana.gomez@example.com", "firstName": "Ana", "lastName": "Gómez"}


@pytest.fixture(scope="module")
def chromium() -> str:
    """Playwright and Debian's chromium, or a skip (a failure under BILLING_TEST_REQUIRE_SERVICES=1)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        service_missing("a browser", f"the playwright package is not importable: {exc}; pip install -e '.[dev]'")
    if not os.access(CHROMIUM, os.X_OK):
        service_missing("a browser", f"no chromium at {CHROMIUM}: apt-get install chromium (or BILLING_TEST_CHROMIUM)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=chromium)
        except Error as exc:
            service_missing("a browser", f"{chromium} did not start: {str(exc).splitlines()[0]}")
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


@dataclass
class WebDemo:
    """`billing demo --web` in a subprocess, with the URLs it printed."""

    proc: subprocess.Popen[str]
    cwd: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "[web] open http" in line:
                self.ready.set()
        self.ready.set()  # it exited: whoever waits sees the output

    def output(self) -> str:
        return "\n".join(self.lines)

    def found(self, pattern: str) -> str:
        match = re.search(pattern, self.output())
        assert match, self.output()
        return match.group(1)

    def wait_ready(self) -> None:
        assert self.ready.wait(READY_TIMEOUT_SECONDS), "billing demo --web did not start:\n" + self.output()
        assert self.proc.poll() is None, "billing demo --web exited:\n" + self.output()

    @property
    def shop_url(self) -> str:
        return self.found(r"\[web\] open (http://\S+/) ")

    @property
    def emulator_url(self) -> str:
        return self.found(r"\[web\] emulator at (http://\S+/)api/ ")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def web_demo(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDemo]:
    """Started before the browser is needed, so the two start at once."""
    demo = _start_web_demo(tmp_path_factory.mktemp("web-demo"))
    yield demo
    demo.stop()


def _fill_card(page: Any, number: str, year: int) -> None:
    page.fill("#id_primaryAccountNumber", number)
    page.fill("#id_cardHolderName", "Ana Gómez")
    page.select_option("#id_expirationMonth", "12")
    page.select_option("#id_expirationYear", str(year))
    page.fill("#id_cvc", "123")


def _private(url: str) -> Any:
    answer = requests.get(url, auth=(DEFAULT_PRIVATE_KEY, ""), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.browser
@pytest.mark.celery
def test_a_card_typed_in_the_checkout_is_associated_to_the_customer_and_charged(
    web_demo: WebDemo, page: Any, tmp_path: Path
):
    web_demo.wait_ready()
    tokens: list[str] = []

    def tokenize(route: Any) -> None:  # passed through unchanged; only read, to look for the token in the logs
        answer = route.fetch()
        tokens.append(answer.json()["token"])
        route.fulfill(response=answer)

    page.route("**/api/tokenize/credit_card", tokenize)
    page.goto(web_demo.shop_url)  # the shop sends the browser to the emulator's checkout
    assert page.url.startswith(web_demo.emulator_url + "__sandbox/checkout?return_to=")
    for name, value in CUSTOMER.items():
        page.fill(f"#id_{name}", value)
    _fill_card(page, "4111111111111111", datetime.now(UTC).year + 2)
    page.screenshot(path=os.environ.get("BILLING_CHECKOUT_SCREENSHOT") or str(tmp_path / "checkout.png"))
    page.click("#submit-id-submit")

    page.wait_for_url(re.compile(r"/subscriptions/sub_[0-9a-f]{12}$"))
    page.locator(".invoice-state", has_text="paid").wait_for()
    assert "active" in page.inner_text("#status")

    ledger = requests.get(web_demo.emulator_url + "__sandbox/ledger", timeout=10).json()
    assert len(ledger["charges"]) == 1, ledger
    charge = ledger["charges"][0]
    assert charge["paid"] and not charge["voided"] and charge["errorCode"] == "00"
    assert (charge["amount"], charge["currency"]) == ("45000.00", "COP")  # the demo's plan
    api = web_demo.emulator_url + "api/"
    card = _private(f"{api}customer/{charge['customer']}/credit_card/{charge['creditCard']}")
    assert card["customer"] == charge["customer"]
    assert (card["lastFour"], card["cardHolderName"], card["expirationMonth"]) == ("1111", "Ana Gómez", "12")
    customer = _private(f"{api}customer/{charge['customer']}")
    assert (customer["email"], customer["firstName"], customer["lastName"]) == tuple(CUSTOMER.values())

    # The token crossed the shop and the broker: it is in no log.
    assert len(tokens) == 1
    for log in ("web-worker.log", "web-beat.log"):
        text = (web_demo.cwd / "demo-logs" / log).read_text()
        assert tokens[0] not in text and DEFAULT_PRIVATE_KEY not in text


@pytest.mark.browser
def test_an_expired_card_is_shown_as_an_error_on_its_field(sandbox_factory: Any, page: Any):
    emulator: SandboxThread = sandbox_factory()
    page.goto(emulator.base_url + "__sandbox/checkout?return_to=http://127.0.0.1:9/never")
    for name, value in CUSTOMER.items():
        page.fill(f"#id_{name}", value)
    _fill_card(page, "4111111111111111", datetime.now(UTC).year - 1)
    page.click("#submit-id-submit")

    errors = page.locator(".payment-errors")
    errors.wait_for(state="visible")
    assert errors.inner_text() == "Datos erróneos en el campo Año"  # the seed's message, the field's label
    assert page.inner_text("#error_expirationYear") == "the card has expired"
    assert page.get_attribute("#id_expirationYear", "aria-invalid") == "true"
    assert "has-error" in (page.get_attribute("#div_id_expirationYear", "class") or "")
    assert page.locator(".field-error").count() == 1  # only the field Tpaga named
    assert page.url.startswith(emulator.base_url)  # nothing was posted to the shop

    # Corrected, the same page tokenizes (and clears the error) without a reload.
    page.select_option("#id_expirationYear", str(datetime.now(UTC).year + 1))
    with page.expect_request("http://127.0.0.1:9/never") as posted:
        page.click("#submit-id-submit")
    assert "tmp_cc_token=" in (posted.value.post_data or "")
    assert len(emulator.sandbox.state.tokens) == 1


@pytest.mark.browser
def test_a_rotated_public_key_shows_the_seeds_authentication_error(sandbox_factory: Any, page: Any):
    emulator: SandboxThread = sandbox_factory()
    page.goto(emulator.base_url + "__sandbox/checkout")  # no return_to: the page shows the token itself
    requests.post(emulator.base_url + "__sandbox/keys", json={"publicKey": "pk_rotated_2"}, timeout=10)
    _fill_card(page, "4111111111111111", datetime.now(UTC).year + 1)
    page.click("#submit-id-submit")
    errors = page.locator(".payment-errors")
    errors.wait_for(state="visible")
    assert errors.inner_text() == "Error de autenticación a la plataforma de pagos."
    assert not emulator.sandbox.state.tokens

    page.reload()  # the page now carries the new key
    _fill_card(page, "4111111111111111", datetime.now(UTC).year + 1)
    page.click("#submit-id-submit")
    page.locator("#token_result").wait_for(state="visible")
    assert list(emulator.sandbox.state.tokens) == [page.inner_text("#token_result").rsplit(" ", 1)[1]]


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment holds `text` (the worker's DATABASE_URL, beat's --schedule
    both name the demo's state directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if any(text.encode() in (proc / part).read_bytes() for part in ("cmdline", "environ")):
                    found.append(int(proc.name))
    return found


def _start_web_demo(cwd: Path) -> WebDemo:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "CELERY_", "TPAGA_", "BILLING_"))}
    billing = Path(sys.executable).with_name("billing")
    proc = subprocess.Popen(
        [str(billing), "demo", "--web", "--port", "0"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    demo = WebDemo(proc, cwd)
    threading.Thread(target=demo.read, daemon=True).start()
    return demo


@pytest.mark.browser  # it stops the demo the browser case used
@pytest.mark.celery
def test_stopping_the_web_demo_stops_its_processes_and_removes_its_state(web_demo: WebDemo):
    web_demo.wait_ready()
    state = Path(web_demo.found(r"\[web\] fresh state in (\S+) "))
    assert state.is_dir() and len(_processes_mentioning(str(state))) >= 2  # the worker and beat at least
    assert web_demo.stop() == 0, web_demo.output()
    assert web_demo.lines[-1] == "[web] stopped"
    assert not state.exists()
    assert _processes_mentioning(str(state)) == []


@pytest.mark.celery
def test_a_sigterm_while_the_web_demo_starts_stops_its_worker_and_beat_too(tmp_path: Path):
    demo = _start_web_demo(tmp_path)
    try:
        # Right after it started the worker and beat, before the shop's event loop takes SIGTERM over.
        for _ in range(READY_TIMEOUT_SECONDS * 10):
            if any("[web] fresh state in" in line for line in demo.lines) or demo.proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        state = demo.found(r"\[web\] fresh state in (\S+) ")
        assert _processes_mentioning(state)
        demo.proc.send_signal(signal.SIGTERM)
        demo.proc.wait(60)
        assert _processes_mentioning(state) == [], demo.output()
        assert not Path(state).exists()
    finally:
        demo.stop()
