"""Helpers for the sandbox tests: a thin raw-HTTP client of the emulator (no tests here)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread

FUTURE_YEAR = str(datetime.now(UTC).year + 3)
TIMEOUT = 10.0


class Emulator:
    """Raw requests against one emulator, with the blog's keys unless told otherwise."""

    def __init__(self, server: SandboxThread) -> None:
        self.server = server
        self.api = server.api_url
        self.base = server.base_url
        self.http = requests.Session()

    # --- Tpaga surface ---

    def post(self, path: str, body: Any = None, *, key: str = DEFAULT_PRIVATE_KEY, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", TIMEOUT)
        if body is not None:
            kw["json"] = body
        return self.http.post(self.api + path, auth=(key, ""), **kw)

    def get(self, path: str, *, key: str = DEFAULT_PRIVATE_KEY) -> requests.Response:
        return self.http.get(self.api + path, auth=(key, ""), timeout=TIMEOUT)

    def delete(self, path: str, *, key: str = DEFAULT_PRIVATE_KEY) -> requests.Response:
        return self.http.delete(self.api + path, auth=(key, ""), timeout=TIMEOUT)

    def customer(self, **fields: Any) -> dict[str, Any]:
        response = self.post("customer", fields or {"firstName": "Ana", "email": "ana@example.com"})
        assert response.status_code == 201, response.text
        return _object(response)

    def tokenize(self, number: str = "4111111111111111", **fields: Any) -> requests.Response:
        body = {
            "primaryAccountNumber": number,
            "expirationMonth": "05",
            "expirationYear": FUTURE_YEAR,
            "cardHolderName": "Ana Perez",
            "cvc": "123",
            **fields,
        }
        return self.post("tokenize/credit_card", body, key=DEFAULT_PUBLIC_KEY)

    def token(self, number: str = "4111111111111111", **fields: Any) -> str:
        response = self.tokenize(number, **fields)
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def card(self, number: str = "4111111111111111", customer_id: str | None = None) -> dict[str, Any]:
        customer_id = customer_id or self.customer()["id"]
        response = self.post(f"customer/{customer_id}/credit_card_token", {"token": self.token(number)})
        assert response.status_code == 201, response.text
        return _object(response)

    def charge(self, card_id: str, amount: Any = 4500, *, timeout: Any = TIMEOUT, **fields: Any) -> requests.Response:
        body = {"creditCard": card_id, "amount": amount, "currency": "COP", "installments": 1, **fields}
        return self.post("charge/credit_card", body, timeout=timeout)

    def refund(self, charge_id: str, **kw: Any) -> requests.Response:
        return self.post("refund/credit_card", {"id": charge_id}, **kw)

    # --- /__sandbox/ surface ---

    def control(self, path: str, body: Any = None) -> dict[str, Any]:
        response = self.http.post(self.base + "__sandbox/" + path, json=body, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return _object(response)

    def control_raw(self, path: str, body: Any = None) -> requests.Response:
        return self.http.post(self.base + "__sandbox/" + path, json=body, timeout=TIMEOUT)

    def look(self, path: str, **params: str) -> dict[str, Any]:
        response = self.http.get(self.base + "__sandbox/" + path, params=params, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return _object(response)

    def ledger(self, **params: str) -> dict[str, Any]:
        return self.look("ledger", **params)

    def faults(self, **body: Any) -> dict[str, Any]:
        return self.control("faults", body)


def _object(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert isinstance(body, dict), response.text
    return body


def field_errors(response: requests.Response) -> list[tuple[str, Any]]:
    """(field, rejected-value) pairs of a 422, after checking Tpaga's error shape."""
    assert response.status_code == 422, (response.status_code, response.text)
    errors = response.json()["errors"]
    assert errors
    for error in errors:
        assert set(error) == {"object", "field", "rejected-value", "message"}, error
        assert error["message"]
    return [(e["field"], e["rejected-value"]) for e in errors]
