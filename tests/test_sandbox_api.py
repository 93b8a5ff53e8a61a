"""The emulator's Tpaga surface (/api/) over real HTTP: tpaga-api.md sections 1 to 5."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from tests.test_sandbox_support import FUTURE_YEAR, Emulator, field_errors

ID = re.compile(r"^[0-9a-z]{32}$")


@pytest.fixture
def tpaga(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


# --- test cards (tpaga-api.md section 5) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "status", "code", "tx_status"),
    [
        ("4111111111111111", 201, "00", "authorized"),
        ("4242424242424242", 201, "00", "authorized"),
        ("5500000000000004", 201, "00", "authorized"),
        ("378282246310005", 201, "00", "authorized"),
        ("4040000000000004", 402, "04", "processor_declined"),
        ("4000000000040008", 402, "04", "processor_declined"),
        ("4000000000050007", 402, "05", "processor_declined"),
        ("4000000000140006", 402, "14", "processor_declined"),
        ("4000000000410003", 402, "41", "processor_declined"),
        ("4000000000430001", 402, "43", "processor_declined"),
        ("4000000000510000", 402, "51", "processor_declined"),
        ("4000000000540007", 402, "54", "processor_declined"),
        ("4000000000610008", 402, "61", "processor_declined"),
        ("4000000000910002", 402, "91", "processor_declined"),
        ("4000000000960007", 402, "96", "processor_declined"),
        ("4000000099990006", 402, "9999", "created"),
        ("4000000000770000", 402, "51", "processor_declined"),
    ],
)
def test_each_test_card_charges_with_its_documented_outcome(
    tpaga: Emulator, number: str, status: int, code: str, tx_status: str
) -> None:
    card = tpaga.card(number)

    response = tpaga.charge(card["id"], orderId="order-1")

    assert response.status_code == status, response.text
    body = response.json()
    assert ID.match(body["id"])
    assert body["errorCode"] == code
    assert body["paid"] is (status == 201)
    assert body["transactionInfo"]["status"] == tx_status
    assert body["amount"] == "4500.00" and body["creditCard"] == card["id"]
    assert body["errorMessage"]
    entry = tpaga.ledger(creditCard=card["id"])["charges"]
    assert [(e["id"], e["errorCode"], e["paid"]) for e in entry] == [(body["id"], code, status == 201)]


def test_card_77_declines_twice_with_51_then_approves_counted_per_permanent_card(tpaga: Emulator) -> None:
    first = tpaga.card("4000000000770000")
    second = tpaga.card("4000000000770000")

    codes = [tpaga.charge(first["id"]).json()["errorCode"] for _ in range(4)]
    other = tpaga.charge(second["id"]).json()["errorCode"]

    assert codes == ["51", "51", "00", "00"]
    assert other == "51"


def test_the_unknown_outcome_card_is_not_charged_but_the_ledger_records_the_9999(tpaga: Emulator) -> None:
    card = tpaga.card("4000000099990006")

    response = tpaga.charge(card["id"], orderId="inv-9")

    assert response.status_code == 402
    assert response.json()["errorCode"] == "9999"
    assert response.json()["paid"] is False
    (entry,) = tpaga.ledger(orderId="inv-9")["charges"]
    assert (entry["errorCode"], entry["paid"], entry["voided"]) == ("9999", False, False)
    assert tpaga.look("stats")["charges"]["unknown"] == 1
    assert tpaga.refund(response.json()["id"]).status_code == 406


def test_a_decline_is_a_402_with_the_full_charge_object(tpaga: Emulator) -> None:
    card = tpaga.card("4000000000430001")

    body = tpaga.charge(card["id"], orderId="o-43", description="d").json()

    assert body["paid"] is False and body["errorCode"] == "43"
    assert body["orderId"] == "o-43" and body["description"] == "d"
    for key in ("netAmount", "tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "reteIvaAmount", "customer"):
        assert key in body
    fetched = tpaga.get(f"charge/credit_card/{body['id']}")
    assert fetched.status_code == 200 and fetched.json() == body


def test_an_association_whose_validation_charge_fails_still_creates_the_card(tpaga: Emulator) -> None:
    customer = tpaga.customer()

    card = tpaga.card("4040000000000004", customer_id=customer["id"])

    assert card["validationCharge"] == {"successful": False, "errorCode": "04"}
    assert tpaga.get(f"customer/{customer['id']}/credit_card/{card['id']}").json() == card
    assert tpaga.ledger()["charges"] == []  # the validation charge is not a merchant charge


def test_a_card_expiring_before_the_charge_declines_with_54(tpaga: Emulator) -> None:
    now = datetime.now(UTC)
    customer = tpaga.customer()
    token = tpaga.token(expirationMonth=str(now.month), expirationYear=str(now.year))
    card = tpaga.post(f"customer/{customer['id']}/credit_card_token", {"token": token}).json()
    assert tpaga.charge(card["id"]).status_code == 201

    tpaga.control("clock", {"advanceSeconds": 40 * 86400})

    assert tpaga.charge(card["id"]).json()["errorCode"] == "54"


# --- objects and money ----------------------------------------------------------------------------------


def test_money_goes_in_as_numbers_and_comes_out_as_two_decimal_strings(tpaga: Emulator) -> None:
    card = tpaga.card()

    body = tpaga.charge(card["id"], amount=1234.5, taxAmount=100, iacAmount=0.25, tipAmount=10).json()

    assert (body["amount"], body["taxAmount"], body["iacAmount"], body["tipAmount"]) == (
        "1234.50",
        "100.00",
        "0.25",
        "10.00",
    )
    assert body["installments"] == 1 and body["currency"] == "COP"


def test_a_customer_echoes_its_fields_and_can_be_read_back(tpaga: Emulator) -> None:
    fields = {
        "firstName": "Ana",
        "lastName": "Perez",
        "email": "ana@example.com",
        "gender": "F",
        "phone": "3001234567",
        "legalIdNumber": "1020304050",
        "merchantCustomerId": "cust-7",
        "address": {"addressLine1": "Cra 7", "addressLine2": None, "postalCode": "110111", "city": None},
    }
    created = tpaga.customer(**fields)

    assert ID.match(created["id"])
    assert {k: created[k] for k in fields} == fields
    assert tpaga.get(f"customer/{created['id']}").json() == created


def test_the_card_object_has_tpagas_fields_and_never_the_number(tpaga: Emulator) -> None:
    customer = tpaga.customer()
    token = tpaga.token("5500000000000004", expirationMonth="5", cardHolderLegalIdNumber="123")

    response = tpaga.post(f"customer/{customer['id']}/credit_card_token", {"token": token, "skipLegalIdCheck": True})

    card = response.json()
    assert response.status_code == 201
    assert (card["bin"], card["lastFour"], card["type"]) == ("550000", "0004", "MASTERCARD")
    assert (card["expirationMonth"], card["expirationYear"]) == ("05", FUTURE_YEAR)
    assert card["customer"] == customer["id"] and card["cardHolderLegalIdNumber"] == "123"
    assert card["addressCountry"] is None
    assert "5500000000000004" not in response.text


def test_any_charset_parameter_is_accepted(tpaga: Emulator) -> None:
    body = '{"firstName": "Muñoz"}'

    latin = tpaga.post(
        "customer",
        data=body.encode("latin-1"),
        headers={"Content-Type": "application/json; charset=ISO-8859-1"},
    )
    utf8 = tpaga.post("customer", data=body.encode(), headers={"Content-Type": "application/json;charset=UTF-8"})

    assert latin.status_code == utf8.status_code == 201
    assert latin.json()["firstName"] == utf8.json()["firstName"] == "Muñoz"


def test_ids_are_opaque_32_character_strings_and_dates_are_iso_8601(tpaga: Emulator) -> None:
    card = tpaga.card()
    body = tpaga.charge(card["id"]).json()

    assert all(ID.match(v) for v in (card["id"], card["customer"], body["id"]))
    created = datetime.fromisoformat(body["dateCreated"])
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)


# --- 401: keys and their scope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("customer", "not-the-key"),
        ("customer", DEFAULT_PUBLIC_KEY),
        ("charge/credit_card", DEFAULT_PUBLIC_KEY),
        ("refund/credit_card", DEFAULT_PUBLIC_KEY),
        ("tokenize/credit_card", DEFAULT_PRIVATE_KEY),
        ("tokenize/credit_card", "wrong"),
    ],
)
def test_a_wrong_key_or_a_key_of_the_wrong_scope_is_a_401(tpaga: Emulator, path: str, key: str) -> None:
    response = tpaga.post(path, {}, key=key)

    assert response.status_code == 401


def test_missing_auth_or_a_non_empty_password_is_a_401(tpaga: Emulator) -> None:
    no_auth = requests.post(tpaga.api + "customer", json={}, timeout=10)
    with_password = requests.post(tpaga.api + "customer", json={}, auth=(DEFAULT_PRIVATE_KEY, "x"), timeout=10)
    bearer = requests.post(
        tpaga.api + "customer", json={}, headers={"Authorization": f"Bearer {DEFAULT_PRIVATE_KEY}"}, timeout=10
    )

    assert (no_auth.status_code, with_password.status_code, bearer.status_code) == (401, 401, 401)


def test_a_401_body_does_not_echo_the_key(tpaga: Emulator) -> None:
    response = tpaga.post("customer", {}, key="sk_live_secret_value")

    assert response.status_code == 401
    assert "sk_live_secret_value" not in response.text


def test_get_endpoints_need_the_private_key(tpaga: Emulator) -> None:
    customer = tpaga.customer()

    assert tpaga.get(f"customer/{customer['id']}", key=DEFAULT_PUBLIC_KEY).status_code == 401


# --- 404 ---------------------------------------------------------------------------------------------------


def test_unknown_ids_are_404(tpaga: Emulator) -> None:
    card = tpaga.card()
    missing = "0" * 32

    assert tpaga.get(f"customer/{missing}").status_code == 404
    assert tpaga.delete(f"customer/{missing}").status_code == 404
    assert tpaga.get(f"customer/{card['customer']}/credit_card/{missing}").status_code == 404
    assert tpaga.get(f"customer/{missing}/credit_card/{card['id']}").status_code == 404
    assert tpaga.post(f"customer/{missing}/credit_card_token", {"token": tpaga.token()}).status_code == 404
    assert tpaga.get(f"charge/credit_card/{missing}").status_code == 404
    assert tpaga.refund(missing).status_code == 404


def test_a_card_is_only_found_under_its_own_customer(tpaga: Emulator) -> None:
    card = tpaga.card()
    stranger = tpaga.customer()

    assert tpaga.get(f"customer/{stranger['id']}/credit_card/{card['id']}").status_code == 404


# --- deletes -----------------------------------------------------------------------------------------------


def test_customers_and_cards_delete_only_when_nothing_depends_on_them(tpaga: Emulator) -> None:
    customer = tpaga.customer()
    charged = tpaga.card(customer_id=customer["id"])
    unused = tpaga.card(customer_id=customer["id"])
    tpaga.charge(charged["id"])

    assert field_errors(tpaga.delete(f"customer/{customer['id']}")) == [("id", customer["id"])]
    assert field_errors(tpaga.delete(f"customer/{customer['id']}/credit_card/{charged['id']}")) == [
        ("id", charged["id"])
    ]
    assert tpaga.delete(f"customer/{customer['id']}/credit_card/{unused['id']}").status_code == 204
    assert tpaga.get(f"customer/{customer['id']}/credit_card/{unused['id']}").status_code == 404
    assert field_errors(tpaga.charge(unused["id"])) == [("creditCard", unused["id"])]


def test_a_customer_without_cards_can_be_deleted(tpaga: Emulator) -> None:
    customer = tpaga.customer()

    assert tpaga.delete(f"customer/{customer['id']}").status_code == 204
    assert tpaga.get(f"customer/{customer['id']}").status_code == 404


# --- refunds and 406 -----------------------------------------------------------------------------------------


def test_a_refund_voids_an_approved_charge_once(tpaga: Emulator) -> None:
    charge = tpaga.charge(tpaga.card()["id"]).json()

    first = tpaga.refund(charge["id"])
    second = tpaga.refund(charge["id"])

    assert first.status_code == 202
    assert second.status_code == 406
    assert second.json()["transactionInfo"]["status"] == "voided"
    assert tpaga.get(f"charge/credit_card/{charge['id']}").json()["paid"] is False
    refunds = tpaga.ledger()["refunds"]
    assert [(r["chargeId"], r["outcome"]) for r in refunds] == [(charge["id"], "voided"), (charge["id"], "refused")]
    (entry,) = tpaga.ledger()["charges"]
    assert (entry["paid"], entry["voided"], entry["status"]) == (True, True, "voided")


def test_a_declined_charge_cannot_be_refunded(tpaga: Emulator) -> None:
    declined = tpaga.charge(tpaga.card("4000000000510000")["id"]).json()

    response = tpaga.refund(declined["id"])

    assert response.status_code == 406
    assert response.json()["id"] == declined["id"] and response.json()["errorCode"] == "51"


def test_the_24_hour_window_is_measured_on_the_emulators_clock(tpaga: Emulator) -> None:
    card = tpaga.card()
    inside = tpaga.charge(card["id"]).json()
    outside = tpaga.charge(card["id"]).json()

    tpaga.control("clock", {"advanceSeconds": 24 * 3600 - 60})
    assert tpaga.refund(inside["id"]).status_code == 202
    tpaga.control("clock", {"advanceSeconds": 61})
    late = tpaga.refund(outside["id"])

    assert late.status_code == 406
    assert late.json()["paid"] is True and late.json()["transactionInfo"]["status"] == "authorized"


def test_the_same_day_window_ends_at_midnight_in_bogota(sandbox_factory: Any) -> None:
    tpaga = Emulator(sandbox_factory(refund_window="same_day"))
    year = datetime.now(UTC).year + 1
    tpaga.control("clock", {"now": f"{year}-03-10T08:00:00-05:00"})
    card = tpaga.card()
    early, late = (tpaga.charge(card["id"]).json() for _ in range(2))

    tpaga.control("clock", {"now": f"{year}-03-10T23:59:00-05:00"})
    same_day = tpaga.refund(early["id"])
    tpaga.control("clock", {"now": f"{year}-03-11T00:01:00-05:00"})
    next_day = tpaga.refund(late["id"])

    assert same_day.status_code == 202
    assert next_day.status_code == 406


# --- 422 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"amount": None}, [("amount", None)]),
        ({"amount": "abc"}, [("amount", "abc")]),
        ({"amount": "4500"}, [("amount", "4500")]),
        ({"amount": 0}, [("amount", "0")]),
        ({"amount": -5}, [("amount", "-5")]),
        ({"amount": 10.001}, [("amount", "10.001")]),
        ({"currency": "USD"}, [("currency", "USD")]),
        ({"currency": None}, [("currency", None)]),
        ({"installments": 0}, [("installments", "0")]),
        ({"installments": 37}, [("installments", "37")]),
        ({"installments": "1"}, [("installments", "1")]),
        ({"installments": True}, [("installments", "true")]),
        ({"taxAmount": -1}, [("taxAmount", "-1")]),
        ({"orderId": 7}, [("orderId", "7")]),
        ({"creditCard": "nope"}, [("creditCard", "nope")]),
        ({"amount": 0, "currency": "USD"}, [("amount", "0"), ("currency", "USD")]),
    ],
)
def test_invalid_charges_are_422_with_field_and_rejected_value(
    tpaga: Emulator, change: dict[str, Any], expected: list[tuple[str, Any]]
) -> None:
    card = tpaga.card()
    body = {"creditCard": card["id"], "amount": 4500, "currency": "COP", "installments": 1, **change}
    body = {k: v for k, v in body.items() if v is not None}

    response = tpaga.post("charge/credit_card", body)

    assert field_errors(response) == expected
    assert tpaga.ledger()["charges"] == []


def test_a_body_that_is_not_json_is_a_422(tpaga: Emulator) -> None:
    response = tpaga.post("charge/credit_card", data=b"amount=4500", headers={"Content-Type": "text/plain"})
    array = tpaga.post("customer", [1, 2])

    assert field_errors(response) == [("body", "amount=4500")]
    assert field_errors(array) == [("body", "[1, 2]")]


def test_a_malformed_email_is_a_422(tpaga: Emulator) -> None:
    assert field_errors(tpaga.post("customer", {"email": "not-an-email"})) == [("email", "not-an-email")]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"primaryAccountNumber": "4111111111111112"}, [("primaryAccountNumber", "411111******1112")]),
        ({"primaryAccountNumber": "41111"}, [("primaryAccountNumber", "*****")]),
        ({"primaryAccountNumber": ""}, [("primaryAccountNumber", "")]),
        ({"expirationMonth": "13"}, [("expirationMonth", "13")]),
        ({"expirationMonth": "ab"}, [("expirationMonth", "ab")]),
        ({"expirationYear": "27"}, [("expirationYear", "27")]),
        ({"expirationYear": "2020"}, [("expirationYear", "2020")]),
        ({"cardHolderName": ""}, [("cardHolderName", "")]),
        ({"cvc": "12"}, [("cvc", "***")]),
    ],
)
def test_malformed_or_expired_cards_are_422_at_tokenize(
    tpaga: Emulator, change: dict[str, Any], expected: list[tuple[str, Any]]
) -> None:
    assert field_errors(tpaga.tokenize(**change)) == expected


def test_an_expiry_month_already_past_this_year_is_a_422(tpaga: Emulator) -> None:
    tpaga.control("clock", {"now": f"{FUTURE_YEAR}-06-15T12:00:00+00:00"})

    response = tpaga.tokenize(expirationMonth="05", expirationYear=FUTURE_YEAR)
    this_month = tpaga.tokenize(expirationMonth="6", expirationYear=FUTURE_YEAR)

    assert field_errors(response) == [("expirationMonth", "5")]
    assert this_month.status_code == 201


def test_card_numbers_grouped_with_spaces_are_accepted(tpaga: Emulator) -> None:
    assert tpaga.tokenize("4111 1111 1111 1111").status_code == 201


def test_a_temporary_token_is_single_use(tpaga: Emulator) -> None:
    customer = tpaga.customer()
    token = tpaga.token()

    first = tpaga.post(f"customer/{customer['id']}/credit_card_token", {"token": token})
    again = tpaga.post(f"customer/{customer['id']}/credit_card_token", {"token": token})

    assert first.status_code == 201
    assert field_errors(again) == [("token", token)]


def test_an_unknown_or_missing_token_is_a_422(tpaga: Emulator) -> None:
    customer = tpaga.customer()
    path = f"customer/{customer['id']}/credit_card_token"

    assert field_errors(tpaga.post(path, {"token": "nope"})) == [("token", "nope")]
    assert field_errors(tpaga.post(path, {})) == [("token", None)]


def test_a_refund_without_an_id_is_a_422(tpaga: Emulator) -> None:
    assert field_errors(tpaga.post("refund/credit_card", {})) == [("id", None)]


def test_a_malformed_tokenize_body_is_never_echoed_back(tpaga: Emulator) -> None:
    form = b"primaryAccountNumber=4111111111111111&cvc=123"

    response = tpaga.post(
        "tokenize/credit_card",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        key=DEFAULT_PUBLIC_KEY,
    )

    assert field_errors(response) == [("body", None)]
    assert "4111111111111111" not in response.text


def test_invalid_charges_are_counted_but_not_recorded(tpaga: Emulator) -> None:
    tpaga.post("charge/credit_card", {"creditCard": "nope", "amount": 1, "currency": "COP", "installments": 1})

    assert tpaga.look("stats")["charges"]["invalid"] == 1
    assert tpaga.ledger()["charges"] == []
