"""The emulator's default, lenient mode (like Tpaga) against its strict mode, over real HTTP.

Lenient: Grails-like binding of numbers and strings, `installments` defaulting to 1, Basic auth by the user name,
the legacy raw-number card creation. Both modes: CORS on the public-key endpoint. Every refusal changes nothing.

"Nothing stored" is read from the emulator's state (customers, tokens and cards have no list endpoint); the
server is idle between requests, so that read from the test's thread is safe.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from tests.test_sandbox_support import FUTURE_YEAR, TIMEOUT, Emulator, field_errors


@pytest.fixture
def lenient(lenient_sandbox: SandboxThread) -> Emulator:
    return Emulator(lenient_sandbox)


@pytest.fixture
def strict(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


def charge_body(card_id: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"creditCard": card_id, "amount": 4500, "currency": "COP", "installments": 1}
    body.update(fields)
    return {name: value for name, value in body.items() if value is not ...}  # `...` leaves a field out


# --- data binding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"installments": "01"}, {"installments": 1}),
        ({"installments": " 3 "}, {"installments": 3}),
        ({"installments": "1.0"}, {"installments": 1}),
        ({"installments": ...}, {"installments": 1}),
        ({"installments": None}, {"installments": 1}),
        ({"installments": ""}, {"installments": 1}),
        ({"amount": "4500"}, {"amount": "4500.00"}),
        ({"amount": "4500.50"}, {"amount": "4500.50"}),
        ({"taxAmount": "0", "tipAmount": "100", "iacAmount": ""}, {"taxAmount": "0.00", "tipAmount": "100.00"}),
        ({"orderId": 123, "thirdPartyId": 456}, {"orderId": "123", "thirdPartyId": "456"}),
        ({"description": 12.5, "childMerchantId": True}, {"description": "12.5", "childMerchantId": "true"}),
    ],
)
def test_a_convertible_charge_field_is_bound_like_grails_and_charged(
    lenient: Emulator, strict: Emulator, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    response = lenient.post("charge/credit_card", charge_body(lenient.card()["id"], **fields))

    assert response.status_code == 201, response.text
    body = response.json()
    assert {name: body[name] for name in expected} == expected
    (entry,) = lenient.ledger()["charges"]
    assert entry["paid"] is True

    refused = strict.post("charge/credit_card", charge_body(strict.card()["id"], **fields))

    assert {name for name, _ in field_errors(refused)} <= set(fields) | {"amount"}
    assert strict.ledger()["charges"] == []


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"installments": "uno"}, "installments", "whole number from 1 to 36"),
        ({"installments": "1.5"}, "installments", "whole number from 1 to 36"),
        ({"installments": "37"}, "installments", "whole number from 1 to 36"),
        ({"installments": "0x1"}, "installments", "whole number from 1 to 36"),
        ({"installments": 1e308}, "installments", "whole number from 1 to 36"),
        ({"installments": True}, "installments", "whole number from 1 to 36"),
        ({"amount": "4.500"}, "amount", "at most two decimals"),
        ({"amount": "4,500"}, "amount", "must be a number"),
        ({"amount": "4500.000"}, "amount", "at most two decimals"),
        ({"amount": "1e5"}, "amount", "must be a number"),
        ({"amount": "NaN"}, "amount", "must be a number"),
        ({"amount": "9" * 60}, "amount", "must be a number"),
        ({"amount": "-4500"}, "amount", "greater than 0"),
        ({"amount": ""}, "amount", "is required"),
        ({"taxAmount": "cero"}, "taxAmount", "must be a number"),
        ({"amount": [4500]}, "amount", "must be a number"),
        ({"orderId": {"n": 1}}, "orderId", "must be a string"),
        ({"thirdPartyId": [456]}, "thirdPartyId", "must be a string"),
        ({"currency": "cop"}, "currency", "must be COP"),
    ],
)
def test_what_cannot_be_converted_is_still_a_422_and_charges_nothing(
    lenient: Emulator, fields: dict[str, Any], field: str, message: str
) -> None:
    card = lenient.card()

    response = lenient.post("charge/credit_card", charge_body(card["id"], **fields))

    [(name, _rejected)] = field_errors(response)
    assert name == field
    assert message in response.json()["errors"][0]["message"]
    assert lenient.ledger()["charges"] == []


def test_customer_and_card_strings_sent_as_numbers_are_bound_as_strings(lenient: Emulator) -> None:
    customer = lenient.customer(
        firstName="Ana", merchantCustomerId=789, phone=3001234567, address={"postalCode": 110111, "city": {}}
    )
    assert (customer["merchantCustomerId"], customer["phone"]) == ("789", "3001234567")
    assert customer["address"]["postalCode"] == "110111"

    token = lenient.token(4111111111111111, expirationMonth=5, cardHolderLegalIdNumber=1020304050)
    card = lenient.post(f"customer/{customer['id']}/credit_card_token", {"token": token, "skipLegalIdCheck": "true"})

    assert card.status_code == 201, card.text
    assert card.json()["cardHolderLegalIdNumber"] == "1020304050"
    assert card.json()["lastFour"] == "1111"


def test_the_strict_emulator_refuses_the_same_customer_and_card_shapes(strict: Emulator) -> None:
    customer = strict.post("customer", {"firstName": "Ana", "merchantCustomerId": 789})
    assert field_errors(customer) == [("merchantCustomerId", "789")]

    tokenize = strict.tokenize(4111111111111111)  # type: ignore[arg-type]
    assert [name for name, _ in field_errors(tokenize)] == ["primaryAccountNumber"]

    associate = strict.post(
        f"customer/{strict.customer()['id']}/credit_card_token", {"token": strict.token(), "skipLegalIdCheck": "true"}
    )
    assert field_errors(associate) == [("skipLegalIdCheck", "true")]


@pytest.mark.parametrize("value", ["yes", "1", 1, {"x": True}])
def test_a_skip_flag_that_is_not_true_or_false_is_a_422_and_uses_no_token(lenient: Emulator, value: Any) -> None:
    customer, token = lenient.customer(), lenient.token()

    response = lenient.post(f"customer/{customer['id']}/credit_card_token", {"token": token, "skipLegalIdCheck": value})

    assert [name for name, _ in field_errors(response)] == ["skipLegalIdCheck"]
    again = lenient.post(f"customer/{customer['id']}/credit_card_token", {"token": token})
    assert again.status_code == 201, again.text  # the refused call did not spend the token


def test_a_refund_id_sent_as_a_number_is_bound_as_a_string(lenient: Emulator) -> None:
    response = lenient.post("refund/credit_card", {"id": 12345})

    assert response.status_code == 404  # bound to "12345", which names no charge; not a 422 on the type
    assert "12345" in response.json()["message"]


# --- auth -------------------------------------------------------------------------------------------------


def basic(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


@pytest.mark.parametrize(
    "credentials", [f"{DEFAULT_PRIVATE_KEY}: ", f"{DEFAULT_PRIVATE_KEY}:secret", f"{DEFAULT_PRIVATE_KEY} "]
)
def test_basic_auth_is_by_user_name_alone_unless_strict(lenient: Emulator, strict: Emulator, credentials: str) -> None:
    for tpaga, status in ((lenient, 201), (strict, 401)):
        response = tpaga.http.post(
            tpaga.api + "customer", json={"firstName": "Ana"}, headers=basic(credentials), timeout=TIMEOUT
        )
        assert response.status_code == status, (tpaga.server.config.strict, response.text)


@pytest.mark.parametrize(
    "credentials",
    [f"{DEFAULT_PUBLIC_KEY}:", f"{DEFAULT_PUBLIC_KEY}: ", f"x{DEFAULT_PRIVATE_KEY}:", f":{DEFAULT_PRIVATE_KEY}", ""],
)
def test_a_wrong_user_name_is_still_a_401_and_creates_nothing(lenient: Emulator, credentials: str) -> None:
    response = lenient.http.post(
        lenient.api + "customer", json={"firstName": "Ana"}, headers=basic(credentials), timeout=TIMEOUT
    )

    assert response.status_code == 401
    assert lenient.look("stats")["requests"] == {"POST customer": 1}
    assert lenient.server.sandbox.state.customers == {}


# --- CORS -------------------------------------------------------------------------------------------------


ORIGIN = {"Origin": "http://shop.example"}


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_the_tokenize_preflight_is_a_204_that_allows_the_browsers_request(
    request: pytest.FixtureRequest, mode: str
) -> None:
    tpaga: Emulator = request.getfixturevalue(mode)
    headers = {
        **ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }

    response = requests.options(tpaga.api + "tokenize/credit_card", headers=headers, timeout=TIMEOUT)

    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert tpaga.server.sandbox.state.tokens == {}


def test_every_tokenize_answer_is_readable_by_the_browser(lenient: Emulator) -> None:
    good = {"primaryAccountNumber": "4111111111111111", "expirationMonth": "05", "expirationYear": FUTURE_YEAR}
    good["cardHolderName"] = "Ana"
    url = lenient.api + "tokenize/credit_card"
    answers = {
        "created": lenient.http.post(url, json=good, auth=(DEFAULT_PUBLIC_KEY, ""), headers=ORIGIN, timeout=TIMEOUT),
        "unauthorized": lenient.http.post(url, json=good, headers=ORIGIN, timeout=TIMEOUT),
        "invalid": lenient.http.post(
            url, json={**good, "expirationMonth": "13"}, auth=(DEFAULT_PUBLIC_KEY, ""), headers=ORIGIN, timeout=TIMEOUT
        ),
        "wrong method": lenient.http.get(url, headers=ORIGIN, timeout=TIMEOUT),
    }

    assert {name: r.status_code for name, r in answers.items()} == {
        "created": 201,
        "unauthorized": 401,
        "invalid": 422,
        "wrong method": 405,
    }
    for name, response in answers.items():
        assert response.headers.get("Access-Control-Allow-Origin") == "*", name


def test_private_key_endpoints_do_not_answer_cors(lenient: Emulator) -> None:
    preflight = requests.options(lenient.api + "charge/credit_card", headers=ORIGIN, timeout=TIMEOUT)
    customer = lenient.http.post(
        lenient.api + "customer", json={}, auth=(DEFAULT_PRIVATE_KEY, ""), headers=ORIGIN, timeout=TIMEOUT
    )

    assert preflight.status_code == 405
    assert customer.status_code == 201
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Origin" not in customer.headers


# --- legacy card creation ---------------------------------------------------------------------------------


def legacy_card(number: Any = "4111111111111111", **fields: Any) -> dict[str, Any]:
    """The body of Tpaga's Ruby README's raw-number card creation (a reconstruction of its shape)."""
    body: dict[str, Any] = {
        "primaryAccountNumber": number,
        "expirationMonth": "08",
        "expirationYear": FUTURE_YEAR,
        "cardVerificationCode": "789",
        "cardHolderName": "Jon Snow",
        "billingAddress": {"addressLine1": "Calle 1", "city": "Bogota", "state": "DC", "country": "CO"},
    }
    body.update(fields)
    return body


def test_the_legacy_card_creation_answers_a_credit_card_that_charges(lenient: Emulator) -> None:
    customer = lenient.customer()
    associated = lenient.card(customer_id=customer["id"])

    response = lenient.post(f"customer/{customer['id']}/credit_card", legacy_card("4000000000510000"))

    assert response.status_code == 201, response.text
    card = response.json()
    assert set(card) == set(associated)  # the same CreditCard resource as tokenize + associate
    assert (card["bin"], card["lastFour"], card["customer"]) == ("400000", "0000", customer["id"])
    assert (card["addressCity"], card["addressCountry"], card["expirationMonth"]) == ("Bogota", "CO", "08")
    assert "4000000000510000" not in response.text
    assert lenient.get(f"customer/{customer['id']}/credit_card/{card['id']}").json() == card
    charge = lenient.charge(card["id"])
    assert (charge.status_code, charge.json()["errorCode"]) == (402, "51")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (legacy_card("4012888888881881"), "primaryAccountNumber"),  # Luhn-valid, but not a test card
        (legacy_card("4111111111111112"), "primaryAccountNumber"),
        (legacy_card(expirationYear="2001"), "expirationYear"),
        (legacy_card(cardHolderName=""), "cardHolderName"),
        (legacy_card(billingAddress="Calle 1"), "billingAddress"),
        ({}, "primaryAccountNumber"),
    ],
)
def test_a_legacy_card_that_is_not_a_valid_test_card_is_a_422_and_creates_nothing(
    lenient: Emulator, body: dict[str, Any], field: str
) -> None:
    customer = lenient.customer()

    response = lenient.post(f"customer/{customer['id']}/credit_card", body)

    assert field in [name for name, _ in field_errors(response)]
    assert "4012888888881881" not in response.text and "4111111111111112" not in response.text
    assert lenient.server.sandbox.state.cards == {}


def test_a_legacy_card_needs_the_private_key_a_known_customer_and_a_json_body(lenient: Emulator) -> None:
    customer = lenient.customer()
    url = f"customer/{customer['id']}/credit_card"

    assert lenient.post(url, legacy_card(), key=DEFAULT_PUBLIC_KEY).status_code == 401
    assert lenient.post("customer/nobody/credit_card", legacy_card()).status_code == 404
    not_json = lenient.post(url, data=b'{"primaryAccountNumber": "4111111111111111",')
    assert field_errors(not_json) == [("body", None)]  # never echoes a body that may hold a card number
    assert lenient.server.sandbox.state.cards == {}


def test_the_strict_emulator_has_no_legacy_card_creation(strict: Emulator) -> None:
    response = strict.post(f"customer/{strict.customer()['id']}/credit_card", legacy_card())

    assert response.status_code == 404
    assert "strict mode" in response.json()["message"]
    assert strict.server.sandbox.state.cards == {}
