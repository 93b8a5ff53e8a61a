"""Real Tpaga clients' request shapes (tests/fixtures/tpaga_clients.json, reconstructions) over real HTTP.

The lenient emulator (the default, like Tpaga) must answer each as Tpaga did: 201/202/402 as the test card
dictates. The strict one (`--strict`, which the project's own client is tested against) must refuse each shape
that depends on Tpaga's leniency, and change nothing when it does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from tests.test_sandbox_support import FUTURE_YEAR, TIMEOUT, Emulator

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "tpaga_clients.json").read_text())["requests"]
# A key each kind of answer must carry, so a 201 of the wrong resource does not pass.
OBJECT_KEYS = {
    "CreditCard": {"bin", "lastFour", "fingerprint", "validationCharge"},
    "Customer": {"id", "firstName", "merchantCustomerId"},
    "CreditCardToken": {"token", "used"},
    "CreditCardCharge": {"paid", "errorCode", "transactionInfo"},
}


def fill(value: Any, names: dict[str, str]) -> Any:
    """The fixture value with its {placeholders} replaced, recursively."""
    if isinstance(value, str):
        for name, replacement in names.items():
            value = value.replace("{" + name + "}", replacement)
        return value
    if isinstance(value, dict):
        return {key: fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [fill(item, names) for item in value]
    return value


def prepare(tpaga: Emulator, fixture: dict[str, Any]) -> dict[str, str]:
    """Makes what the request refers to, through the documented surface only."""
    customer = tpaga.customer()
    names = {
        "private": DEFAULT_PRIVATE_KEY,
        "public": DEFAULT_PUBLIC_KEY,
        "year": FUTURE_YEAR,
        "customer": customer["id"],
    }
    if fixture["card"]:
        names["card"] = tpaga.card(fixture["card"], customer_id=customer["id"])["id"]
    if "{charge}" in json.dumps(fixture["body"]):
        approved = tpaga.charge(names["card"])
        assert approved.status_code == 201, approved.text
        names["charge"] = approved.json()["id"]
    return names


def send(tpaga: Emulator, fixture: dict[str, Any], names: dict[str, str]) -> requests.Response:
    credentials = base64.b64encode(fill(fixture["auth"], names).encode()).decode()
    headers = {**fill(fixture["headers"], names), "Authorization": "Basic " + credentials}
    url = tpaga.base + fill(fixture["path"], names).lstrip("/")
    body = json.dumps(fill(fixture["body"], names)).encode()
    return requests.request(fixture["method"], url, data=body, headers=headers, timeout=TIMEOUT)


def snapshot(tpaga: Emulator, names: dict[str, str]) -> dict[str, Any]:
    """What a refused request must leave as it was: the ledger, the counters, the charge it names."""
    stats = tpaga.look("stats")
    outcomes = {name: count for name, count in stats["charges"].items() if name != "invalid"}  # a 422 counts there
    seen: dict[str, Any] = {"ledger": tpaga.ledger(), "charges": outcomes, "refunds": stats["refunds"]}
    if "charge" in names:
        seen["charge"] = tpaga.get(f"charge/credit_card/{names['charge']}").json()
    # Customers, tokens and cards have no list endpoint: the emulator is idle here, so its state reads safely.
    state = tpaga.server.sandbox.state
    seen["stored"] = (len(state.customers), len(state.tokens), len(state.cards))
    return seen


def check(response: requests.Response, expected: dict[str, Any]) -> None:
    assert response.status_code == expected["status"], response.text
    body = response.json() if response.content else {}
    if "fields" in expected:
        assert sorted(e["field"] for e in body["errors"]) == sorted(expected["fields"])
        assert all(e["message"] for e in body["errors"])  # the Android SDK shows errors[0].message
    if "object" in expected:
        assert OBJECT_KEYS[expected["object"]] <= set(body), body
    if "errorCode" in expected:
        assert body["errorCode"] == expected["errorCode"]
        assert body["paid"] is (expected["errorCode"] == "00")
    for name, value in expected.get("echo", {}).items():
        assert body[name] == value, name
    if expected.get("cors"):
        assert response.headers.get("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f["id"] for f in FIXTURES])
def test_a_real_clients_request_gets_tpagas_answer_from_the_lenient_emulator(
    lenient_sandbox: SandboxThread, fixture: dict[str, Any]
) -> None:
    tpaga = Emulator(lenient_sandbox)
    names = prepare(tpaga, fixture)

    response = send(tpaga, fixture, names)

    check(response, fixture["lenient"])
    if fixture["path"] == "/api/charge/credit_card" and response.status_code in (201, 402):
        (entry,) = tpaga.ledger()["charges"]
        assert entry["errorCode"] == response.json()["errorCode"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f["id"] for f in FIXTURES])
def test_the_strict_emulator_refuses_each_shape_that_needs_leniency_and_changes_nothing(
    sandbox: SandboxThread, fixture: dict[str, Any]
) -> None:
    tpaga = Emulator(sandbox)
    names = prepare(tpaga, fixture)
    before = snapshot(tpaga, names)

    response = send(tpaga, fixture, names)

    check(response, fixture["strict"])
    if response.status_code >= 400:
        assert snapshot(tpaga, names) == before


def test_every_fixture_that_strict_mode_accepts_is_a_declared_control() -> None:
    # A fixture added without a refusal would silently stop testing strict mode: each such one says why.
    accepted = [f["id"] for f in FIXTURES if f["strict"]["status"] < 400 or f["strict"] == f["lenient"]]
    for fixture in FIXTURES:
        if fixture["id"] in accepted:
            assert "control" in fixture["source"], fixture["id"]
    assert len(accepted) < len(FIXTURES) // 4
