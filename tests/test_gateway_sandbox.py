"""The client against the bundled emulator over real HTTP: the seed flow, every test card, every error status,
and every injected fault checked against the emulator's ledger (exactly the charges that were made)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
import requests

from billing.domain.declines import DeclineClass
from billing.gateway import (
    CreditCard,
    Customer,
    DeclinedError,
    NotFoundError,
    OutcomeUnknownError,
    RefundRejectedError,
    TpagaClient,
    UnauthorizedError,
    ValidationError,
)
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread


class NoJitter:
    def random(self) -> float:
        return 0.0


class Emulator:
    """The running emulator's /__sandbox/ surface."""

    def __init__(self, server: SandboxThread) -> None:
        self.base = server.base_url + "__sandbox/"
        self.api_url = server.api_url

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        response = requests.post(self.base + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def faults(self, **body: Any) -> Any:
        return self._post("faults", body)

    def advance(self, seconds: float) -> Any:
        return self._post("clock", {"advanceSeconds": seconds})

    def script(self, card_id: str, outcomes: list[str]) -> Any:
        return self._post("script", {"creditCard": card_id, "outcomes": outcomes})

    def ledger(self, **query: str) -> dict[str, list[dict[str, Any]]]:
        response = requests.get(self.base + "ledger", params=query, timeout=10)
        response.raise_for_status()
        result: dict[str, list[dict[str, Any]]] = response.json()
        return result


@pytest.fixture
def emulator(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


@pytest.fixture
def client(emulator: Emulator) -> Iterator[TpagaClient]:
    tpaga = TpagaClient(
        emulator.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, read_timeout_seconds=5.0, rng=NoJitter()
    )
    yield tpaga
    tpaga.close()


def new_card(client: TpagaClient, number: str = "4111111111111111") -> tuple[Customer, CreditCard]:
    customer = client.create_customer(first_name="Horns and Hoofs", last_name="Perez", email="h@example.com")
    token = client.tokenize_card(number=number, exp_month=5, exp_year=2035, holder_name="Iván Pérez", cvc="123")
    return customer, client.associate_card(customer.id, token)


def charge(client: TpagaClient, card: CreditCard, order_id: str, amount: Decimal = Decimal(4500)) -> Any:
    return client.charge(card_id=card.id, amount=amount, order_id=order_id, description="One bridge")


# --- the seed flow ------------------------------------------------------------------------------------------


def test_the_seed_flow_end_to_end(client: TpagaClient, emulator: Emulator) -> None:
    customer = client.create_customer(
        first_name="Horns and Hoofs",
        last_name="Perez",
        email="hornsandhoofs@example.com",
        phone="012345678",
        merchant_customer_id="m-42",
    )
    assert customer.id and customer.first_name == "Horns and Hoofs" and customer.last_name == "Perez"
    assert customer.email == "hornsandhoofs@example.com" and customer.phone == "012345678"
    assert customer.merchant_customer_id == "m-42"
    assert client.get_customer(customer.id) == customer

    token = client.tokenize_card(number="4111111111111111", exp_month="05", exp_year=2035, holder_name="Iván")
    assert isinstance(token, str) and token

    card = client.associate_card(customer.id, token)
    assert card.customer_id == customer.id
    assert (card.brand, card.bin, card.last_four) == ("VISA", "411111", "1111")
    assert (card.expiration_month, card.expiration_year) == (5, 2035)
    assert card.card_holder_name == "Iván"
    assert card.fingerprint is not None and len(card.fingerprint) == 64
    assert card.validation_successful is True and card.validation_error_code == "00"
    assert client.get_card(customer.id, card.id) == card

    approved = client.charge(card_id=card.id, amount=Decimal(4500), order_id="BRG-2", description="One bridge")
    assert approved.approved and approved.paid and approved.status == "authorized"
    assert approved.amount == Decimal("4500.00") and approved.currency == "COP"
    assert approved.card_id == card.id and approved.customer_id == customer.id and approved.order_id == "BRG-2"
    assert approved.error_code == "00" and approved.error_message == "Approved"
    assert approved.authorization_code and approved.installments == 1
    assert approved.net_amount == Decimal("3545.00") and approved.tpaga_fee_amount == Decimal("868.00")
    assert isinstance(approved.date_created, datetime) and approved.date_created.tzinfo is not None
    assert client.get_charge(approved.id) == approved

    voided = client.refund(approved.id)
    assert voided.id == approved.id and voided.voided and not voided.paid and not voided.approved
    assert voided.error_code == "00" and voided.amount == approved.amount
    assert client.get_charge(approved.id).voided

    ledger = emulator.ledger(orderId="BRG-2")
    assert [(c["id"], c["voided"]) for c in ledger["charges"]] == [(approved.id, True)]
    assert [r["outcome"] for r in ledger["refunds"]] == ["voided"]


def test_a_fractional_amount_goes_out_exact(client: TpagaClient) -> None:
    _, card = new_card(client)
    approved = charge(client, card, "frac-1", Decimal("4500.50"))
    assert approved.amount == Decimal("4500.50")


# --- test cards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4111111111111111", "VISA"),
        ("4242424242424242", "VISA"),
        ("5500000000000004", "MASTERCARD"),
        ("378282246310005", "AMEX"),
    ],
)
def test_approving_cards(client: TpagaClient, number: str, brand: str) -> None:
    _, card = new_card(client, number)
    assert card.brand == brand
    assert charge(client, card, f"ok-{number}").approved


@pytest.mark.parametrize(
    ("number", "code", "decline_class"),
    [
        ("4000000000040008", "04", DeclineClass.HARD),
        ("4000000000050007", "05", DeclineClass.SOFT),
        ("4000000000140006", "14", DeclineClass.HARD),
        ("4000000000410003", "41", DeclineClass.HARD),
        ("4000000000430001", "43", DeclineClass.HARD),
        ("4000000000510000", "51", DeclineClass.SOFT),
        ("4000000000540007", "54", DeclineClass.HARD),
        ("4000000000610008", "61", DeclineClass.SOFT),
        ("4000000000910002", "91", DeclineClass.SOFT),
        ("4000000000960007", "96", DeclineClass.SOFT),
        ("4040000000000004", "04", DeclineClass.HARD),
    ],
)
def test_declining_cards(
    client: TpagaClient, emulator: Emulator, number: str, code: str, decline_class: DeclineClass
) -> None:
    _, card = new_card(client, number)
    order_id = f"decl-{number}"
    with pytest.raises(DeclinedError) as caught:
        charge(client, card, order_id)
    error = caught.value
    assert error.error_code == code and error.decline_class is decline_class
    assert error.charge.card_id == card.id and not error.charge.paid and error.charge.order_id == order_id
    assert card.id not in str(error)
    assert client.get_charge(error.charge.id).error_code == code
    assert len(emulator.ledger(orderId=order_id)["charges"]) == 1


def test_the_validation_failing_card_is_still_associated(client: TpagaClient) -> None:
    _, card = new_card(client, "4040000000000004")
    assert card.validation_successful is False and card.validation_error_code == "04"


def test_the_unknown_outcome_card_is_unknown_with_a_charge_id_to_look_up(
    client: TpagaClient, emulator: Emulator
) -> None:
    _, card = new_card(client, "4000000099990006")
    with pytest.raises(OutcomeUnknownError) as caught:
        charge(client, card, "unknown-1")
    assert caught.value.reason == "unknown_code" and caught.value.http_status == 402
    assert caught.value.charge_id is not None
    looked_up = client.get_charge(caught.value.charge_id)
    assert looked_up.error_code == "9999" and not looked_up.approved
    assert len(emulator.ledger(orderId="unknown-1")["charges"]) == 1


def test_the_dunning_recovery_card_declines_twice_then_approves(client: TpagaClient) -> None:
    _, card = new_card(client, "4000000000770000")
    for attempt in (1, 2):
        with pytest.raises(DeclinedError) as caught:
            charge(client, card, f"dun-{attempt}")
        assert caught.value.error_code == "51" and caught.value.decline_class is DeclineClass.SOFT
    assert charge(client, card, "dun-3").approved


def test_scripted_outcomes(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    emulator.script(card.id, ["51", "", "00"])
    with pytest.raises(DeclinedError):
        charge(client, card, "s-1")
    with pytest.raises(OutcomeUnknownError) as unknown:
        charge(client, card, "s-2")
    assert unknown.value.reason == "unknown_code"
    assert charge(client, card, "s-3").approved


# --- error statuses ---------------------------------------------------------------------------------------


def test_a_wrong_private_key_is_unauthorized(emulator: Emulator) -> None:
    wrong = "x" * 32
    with TpagaClient(emulator.api_url, wrong, wrong) as tpaga:
        with pytest.raises(UnauthorizedError) as caught:
            tpaga.create_customer(email="a@example.com")
        assert caught.value.http_status == 401 and wrong not in str(caught.value)
        with pytest.raises(UnauthorizedError):
            tpaga.get_charge("anything")
        with pytest.raises(UnauthorizedError):
            tpaga.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="A")


def test_keys_are_scoped(emulator: Emulator) -> None:
    # The public key cannot charge, and the private key cannot tokenize.
    with TpagaClient(emulator.api_url, DEFAULT_PUBLIC_KEY, DEFAULT_PRIVATE_KEY) as swapped:
        with pytest.raises(UnauthorizedError):
            swapped.get_charge("anything")
        with pytest.raises(UnauthorizedError):
            swapped.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="A")


def test_unknown_ids_are_not_found(client: TpagaClient) -> None:
    customer, card = new_card(client)
    for call in (
        lambda: client.get_charge("nosuchcharge"),
        lambda: client.get_customer("nosuchcustomer"),
        lambda: client.get_card(customer.id, "nosuchcard"),
        lambda: client.get_card("nosuchcustomer", card.id),
        lambda: client.refund("nosuchcharge"),
    ):
        with pytest.raises(NotFoundError) as caught:
            call()
        assert caught.value.http_status == 404
        assert card.id not in str(caught.value)


def test_refunding_twice_is_rejected_with_the_voided_charge(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    approved = charge(client, card, "twice")
    client.refund(approved.id)
    with pytest.raises(RefundRejectedError) as caught:
        client.refund(approved.id)
    assert caught.value.http_status == 406
    assert caught.value.charge is not None and caught.value.charge.voided
    assert [r["outcome"] for r in emulator.ledger(orderId="twice")["refunds"]] == ["voided", "refused"]


def test_a_refund_after_the_void_window_is_rejected(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    approved = charge(client, card, "late")
    emulator.advance(25 * 3600)
    with pytest.raises(RefundRejectedError) as caught:
        client.refund(approved.id)
    assert caught.value.charge is not None and not caught.value.charge.voided
    assert client.get_charge(approved.id).approved


def test_a_declined_charge_cannot_be_refunded(client: TpagaClient) -> None:
    _, card = new_card(client, "4000000000510000")
    with pytest.raises(DeclinedError) as caught:
        charge(client, card, "declined-refund")
    with pytest.raises(RefundRejectedError):
        client.refund(caught.value.charge.id)


def test_validation_errors_name_the_field(client: TpagaClient) -> None:
    with pytest.raises(ValidationError) as bad_email:
        client.create_customer(email="not-an-email")
    assert bad_email.value.http_status == 422
    assert [e.field for e in bad_email.value.errors] == ["email"]

    customer = client.create_customer(email="a@example.com")
    token = client.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="A")
    client.associate_card(customer.id, token)
    with pytest.raises(ValidationError) as spent:
        client.associate_card(customer.id, token)  # a temporary token is single use
    assert [e.field for e in spent.value.errors] == ["token"]
    assert token not in str(spent.value) and token not in repr(spent.value.errors)

    with pytest.raises(ValidationError) as expired:
        client.tokenize_card(number="4111111111111111", exp_month=1, exp_year=2001, holder_name="A")
    assert expired.value.errors[0].field == "expirationYear"

    with pytest.raises(ValidationError) as unknown_card:
        client.charge(card_id="nosuchcard", amount=Decimal(100), order_id="v-1")
    assert [e.field for e in unknown_card.value.errors] == ["creditCard"]
    assert "nosuchcard" not in str(unknown_card.value)


# --- injected faults, proven against the ledger --------------------------------------------------------------


def test_a_5xx_on_a_charge_is_unknown_and_the_ledger_shows_no_charge(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    emulator.faults(nextCharges=["5xx", "ok"])
    with pytest.raises(OutcomeUnknownError) as caught:
        charge(client, card, "fault-5xx")
    assert caught.value.reason == "server_error" and caught.value.http_status in (502, 504)
    assert emulator.ledger(orderId="fault-5xx")["charges"] == []
    assert emulator.ledger(creditCard=card.id)["charges"] == []  # and it was not retried


def test_a_dropped_charge_is_unknown_and_the_ledger_shows_exactly_one_charge(
    client: TpagaClient, emulator: Emulator
) -> None:
    _, card = new_card(client)
    emulator.faults(nextCharges=["drop", "ok"])
    with pytest.raises(OutcomeUnknownError) as caught:
        charge(client, card, "fault-drop")
    assert caught.value.reason == "dropped" and caught.value.charge_id is None
    charges = emulator.ledger(orderId="fault-drop")["charges"]
    assert len(charges) == 1  # made once, never retried
    assert charges[0]["paid"] is True and charges[0]["delivery"] == "dropped"


def test_garbage_answers_to_a_charge_are_unknown_and_never_retried(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    emulator.faults(nextCharges=["garbage", "garbage", "ok"])
    reasons = []
    for order_id in ("garbage-1", "garbage-2"):
        with pytest.raises(OutcomeUnknownError) as caught:
            charge(client, card, order_id)
        reasons.append(caught.value.reason)
        assert len(emulator.ledger(orderId=order_id)["charges"]) == 1
    assert sorted(reasons) == ["malformed", "server_error"]  # an HTML 502, and a 201 cut off mid-JSON
    assert len(emulator.ledger(creditCard=card.id)["charges"]) == 2


def test_a_slow_charge_times_out_as_unknown(emulator: Emulator) -> None:
    with TpagaClient(
        emulator.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, read_timeout_seconds=0.5, rng=NoJitter()
    ) as tpaga:
        _, card = new_card(tpaga)
        emulator.faults(nextCharges=["slow"], slowSeconds=3)
        with pytest.raises(OutcomeUnknownError) as caught:
            charge(tpaga, card, "fault-slow")
        assert caught.value.reason == "timeout"
        assert len(emulator.ledger(orderId="fault-slow")["charges"]) == 1


def test_a_refund_is_retried_through_a_5xx(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    approved = charge(client, card, "refund-5xx")
    emulator.faults(nextRefunds=["5xx", "ok"])
    assert client.refund(approved.id).voided
    assert [r["outcome"] for r in emulator.ledger(orderId="refund-5xx")["refunds"]] == ["voided"]


def test_a_refund_whose_answer_was_dropped_is_retried_and_recognised(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    approved = charge(client, card, "refund-drop")
    emulator.faults(nextRefunds=["drop", "ok"])
    voided = client.refund(approved.id)  # the first attempt voided it; the retry's 406 says so
    assert voided.voided
    refunds = emulator.ledger(orderId="refund-drop")["refunds"]
    assert [(r["outcome"], r["delivery"]) for r in refunds] == [("voided", "dropped"), ("refused", "ok")]


def test_latency_within_the_read_timeout_is_fine(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    emulator.faults(latencyMs=50)
    assert charge(client, card, "latency").approved


def test_concurrent_charges_from_a_thread_pool_are_each_made_once(client: TpagaClient, emulator: Emulator) -> None:
    _, card = new_card(client)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: charge(client, card, f"pool-{i}"), range(40)))
    assert all(r.approved for r in results)
    ledger = emulator.ledger(creditCard=card.id)["charges"]
    assert sorted(c["orderId"] for c in ledger) == sorted(f"pool-{i}" for i in range(40))


def test_the_gateway_logs_no_secret_across_faults(
    client: TpagaClient, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    customer = client.create_customer(email="a@example.com")
    token = client.tokenize_card(number="4111111111111111", exp_month=5, exp_year=2035, holder_name="A")
    card = client.associate_card(customer.id, token)
    client.get_card(customer.id, card.id)
    emulator.faults(nextCharges=["drop", "5xx", "ok"], nextRefunds=["5xx", "ok"])
    for order_id in ("log-1", "log-2"):
        with pytest.raises(OutcomeUnknownError):
            charge(client, card, order_id)
    approved = charge(client, card, "log-3")
    client.refund(approved.id)
    gateway_lines = [r.getMessage() for r in caplog.records if r.name.startswith("billing.gateway")]
    assert any("retrying" in line for line in gateway_lines)
    for line in gateway_lines:
        for secret in (DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, token, card.id):
            assert secret not in line
    urllib3_lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("urllib3"))
    for secret in (DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, token):
        assert secret not in urllib3_lines
