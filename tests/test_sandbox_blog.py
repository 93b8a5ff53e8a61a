"""The 2016 blog's integration (seed-tpaga-python-blog.md) runs unchanged against the emulator."""

# The blog's code below is pasted verbatim, so its 2016 `.format` calls stay.
# ruff: noqa: UP032

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from urllib import parse as urlparse

import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from tests.test_sandbox_support import FUTURE_YEAR

ID = re.compile(r"^[0-9a-z]{32}$")

# ---- pasted from the blog, unchanged (its snippets joined into one class; only the "# ..." lines dropped) ----
# fmt: off
TPAGA_PRIVATE_TOKEN = 'd13fr8n7vhvkuch3lq2ds5qhjnd2pdd2'
TPAGA_API_URL = 'https://sandbox.tpaga.co/api/'

class TpagaTestClient:
    def __init__(
            self,
            private_token=TPAGA_PRIVATE_TOKEN,
            base_url=TPAGA_API_URL,
    ):
        self.base_url = base_url
        self.private_token = private_token

    def api_post(self, path, data, token=None):
        if not token:
            token = self.private_token
        return requests.post(
            urlparse.urljoin(self.base_url, path),
            json=data, auth=(token, ''),
        )

    def fail(self, response):
        raise Exception(
            'Whoops, got\n\nSTATUS: {}\n\nHEADERS: {}\n\nCONTENT: {}'.format(
                response.status_code,
                response.headers,
                response.content,
            ))

    def json_from_response(self, response, expected_http_code=None):
        if not expected_http_code:
            expected_http_code = [201]
        if response.status_code not in expected_http_code:
            self.fail(response)
        if not response.content:
            return None
        return response.json()

    def create_customer(self, data):
        response = self.api_post('customer', data)
        return self.json_from_response(response)

    def assoc_cc_to_customer(self, customer_token, cc_temp_token=None):
        cdata = {'token': cc_temp_token }
        response = self.api_post(
            'customer/{}/credit_card_token'.format(customer_token), cdata
        )
        return self.json_from_response(response)

    def charge_cc(self, cc_token, order_id='BRG-2', amount=1000):
        cdata = {
              'orderId': order_id,
              'currency': 'COP',
              'taxAmount': 0,
              'description': 'One bridge in good condition.',
              'installments': 1,
              'amount': amount,
              'creditCard': cc_token,
        }
        response = self.api_post('charge/credit_card', cdata)
        return self.json_from_response(response)

    def refund_cc(self, cc_charge_id):
        cdata = {
            'id': cc_charge_id,
        }
        response = self.api_post('refund/credit_card', cdata)
        return self.json_from_response(response, expected_http_code=[202])
# fmt: on
# ---- end of the blog's code ----


def _browser_tokenize(api_url: str, number: str) -> str:
    """What the blog's jQuery form does: send the card to tokenize with the PUBLIC key."""
    response = requests.post(
        api_url + "tokenize/credit_card",
        json={
            "primaryAccountNumber": number,
            "cardHolderName": "Иван Иваныч",
            "expirationMonth": "03",
            "expirationYear": FUTURE_YEAR,
            "cvc": "123",
        },
        auth=(DEFAULT_PUBLIC_KEY, ""),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["used"] is False
    return body["token"]


def test_the_blogs_own_client_runs_its_flow_against_the_emulator(sandbox: SandboxThread) -> None:
    client = TpagaTestClient(private_token=DEFAULT_PRIVATE_KEY, base_url=sandbox.api_url)

    customer = client.create_customer(
        {
            "firstName": "Horns and Hoofs",
            "lastName": "Perez",
            "email": "hornsandhoofs@example.com",
            "phone": "012345678",
        }
    )
    customer_token = customer["id"]
    credit_card = client.assoc_cc_to_customer(
        customer_token=customer_token, cc_temp_token=_browser_tokenize(sandbox.api_url, "4111111111111111")
    )
    credit_card_token = credit_card["id"]
    charge_cc_response = client.charge_cc(cc_token=credit_card_token, amount=4500)
    refund_cc_response = client.refund_cc(charge_cc_response["id"])

    assert ID.match(customer_token) and ID.match(credit_card_token)
    assert credit_card["validationCharge"] == {"successful": True, "errorCode": "00"}
    assert charge_cc_response["paid"] is True
    assert charge_cc_response["amount"] == "4500.00"
    assert charge_cc_response["orderId"] == "BRG-2"
    assert refund_cc_response["transactionInfo"]["status"] == "voided"
    assert refund_cc_response["paid"] is False


def test_the_blogs_client_sees_the_validation_charge_fail_on_card_4040(sandbox: SandboxThread) -> None:
    client = TpagaTestClient(private_token=DEFAULT_PRIVATE_KEY, base_url=sandbox.api_url)
    customer = client.create_customer({})
    card = client.assoc_cc_to_customer(customer["id"], _browser_tokenize(sandbox.api_url, "4040000000000004"))

    assert card["validationCharge"] == {"successful": False, "errorCode": "04"}
    assert (card["bin"], card["lastFour"], card["type"]) == ("404000", "0004", "VISA")
    assert re.fullmatch(r"[0-9a-f]{64}", card["fingerprint"])


def test_the_blog_flow_with_raw_requests_matches_the_blogs_sample_amounts(sandbox: SandboxThread) -> None:
    api, private = sandbox.api_url, (DEFAULT_PRIVATE_KEY, "")
    customer = requests.post(api + "customer", json={}, auth=private, timeout=10)
    assert customer.status_code == 201
    token = _browser_tokenize(api, "4111111111111111")
    card = requests.post(
        api + f"customer/{customer.json()['id']}/credit_card_token", json={"token": token}, auth=private, timeout=10
    )
    assert card.status_code == 201
    charge = requests.post(
        api + "charge/credit_card",
        json={
            "orderId": "BRG-2",
            "currency": "COP",
            "taxAmount": 0,
            "description": "One bridge in good condition.",
            "installments": 1,
            "amount": 4500,
            "creditCard": card.json()["id"],
        },
        auth=private,
        timeout=10,
    )

    assert charge.status_code == 201
    body = charge.json()
    assert {k: body[k] for k in ("amount", "tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "netAmount")} == {
        "amount": "4500.00",
        "tpagaFeeAmount": "868.00",
        "reteRentaAmount": "68.00",
        "reteIcaAmount": "19.00",
        "netAmount": "3545.00",
    }
    assert body["taxAmount"] == body["iacAmount"] == body["tipAmount"] == body["reteIvaAmount"] == "0.00"
    assert body["errorCode"] == "00" and body["errorMessage"] == "Approved"
    assert body["transactionInfo"]["status"] == "authorized"
    assert re.fullmatch(r"\d{6}", body["transactionInfo"]["authorizationCode"])
    assert ID.match(body["id"]) and ID.match(body["paymentTransaction"])
    assert body["customer"] == customer.json()["id"] and body["creditCard"] == card.json()["id"]
    assert body["thirdPartyId"] is None and body["childMerchantId"] is None
    assert datetime.fromisoformat(body["dateCreated"]).utcoffset() is not None

    refund = requests.post(api + "refund/credit_card", json={"id": body["id"]}, auth=private, timeout=10)

    assert refund.status_code == 202
    voided = refund.json()
    assert voided["paid"] is False and voided["transactionInfo"]["status"] == "voided"
    assert voided["errorCode"] == "00"
    unchanged = ("id", "amount", "netAmount", "tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "orderId")
    assert {k: voided[k] for k in unchanged} == {k: body[k] for k in unchanged}
    net = Decimal(body["amount"]) - sum(
        Decimal(body[k]) for k in ("tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "reteIvaAmount")
    )
    assert net == Decimal(body["netAmount"])
