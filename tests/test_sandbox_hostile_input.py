"""Hostile input over real HTTP: every bad body, header or clock move is a 4xx with a clear body, never a 500,
changes nothing, and the emulator still approves a normal charge afterwards."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxThread
from tests.test_sandbox_support import FUTURE_YEAR, TIMEOUT, Emulator, field_errors

MAX_DEPTH = 32  # billing.sandbox.validate.MAX_DEPTH, restated: the tests pin the documented limit
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def tpaga(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


def raw_charge(tpaga: Emulator, card_id: str, **raw_fields: str) -> requests.Response:
    """A charge whose fields are JSON text as written, so numbers such as 1e308 reach the server unrounded."""
    fields = {"creditCard": json.dumps(card_id), "amount": "4500", "currency": '"COP"', "installments": "1"}
    fields.update(raw_fields)
    body = "{" + ",".join(f'"{name}":{text}' for name, text in fields.items()) + "}"
    return tpaga.post("charge/credit_card", data=body.encode(), headers=JSON_HEADERS)


def post_clock(tpaga: Emulator, body: bytes) -> requests.Response:
    return tpaga.http.post(tpaga.base + "__sandbox/clock", data=body, headers=JSON_HEADERS, timeout=TIMEOUT)


def assert_still_charges(tpaga: Emulator) -> None:
    response = tpaga.charge(tpaga.card()["id"])
    assert response.status_code == 201, response.text
    assert response.json()["paid"] is True


def nested(depth: int) -> str:
    """JSON text of `depth` nested objects (depth 1 is `{}`)."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


# --- money ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["amount", "taxAmount", "tipAmount"])
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e26", "is too large"),
        ("1e308", "is too large"),
        ("1E+1000000000", "is too large"),
        ("123456789012345678901234567890.5", "is too large"),
        ("-1e308", "must not be negative|must be greater than 0"),  # amount must be > 0, the others >= 0
    ],
)
def test_an_amount_far_out_of_range_is_a_422_on_that_field(
    tpaga: Emulator, field: str, text: str, message: str
) -> None:
    card = tpaga.card()

    response = raw_charge(tpaga, card["id"], **{field: text})

    [(name, _rejected)] = field_errors(response)
    assert name == field
    assert re.fullmatch(message, response.json()["errors"][0]["message"])
    assert tpaga.ledger()["charges"] == []
    assert_still_charges(tpaga)


# --- body shape: nesting, surrogates, size ----------------------------------------------------------------


TPAGA_POSTS = [
    ("customer", DEFAULT_PRIVATE_KEY),
    ("tokenize/credit_card", DEFAULT_PUBLIC_KEY),
    ("charge/credit_card", DEFAULT_PRIVATE_KEY),
    ("refund/credit_card", DEFAULT_PRIVATE_KEY),
]
CONTROL_POSTS = ["clock", "faults", "script", "keys"]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 100_000])
def test_a_body_nested_too_deep_is_a_422_on_body_everywhere(tpaga: Emulator, depth: int) -> None:
    body = nested(depth).encode()

    answers = [tpaga.post(path, data=body, headers=JSON_HEADERS, key=key) for path, key in TPAGA_POSTS]
    answers += [
        tpaga.http.post(tpaga.base + "__sandbox/" + path, data=body, headers=JSON_HEADERS, timeout=TIMEOUT)
        for path in CONTROL_POSTS
    ]

    for response in answers:
        assert field_errors(response) == [("body", None)], response.url
        assert f"deeper than {MAX_DEPTH} levels" in response.json()["errors"][0]["message"]
    assert_still_charges(tpaga)


def test_nesting_up_to_the_limit_is_accepted(tpaga: Emulator) -> None:
    card = tpaga.card()

    # Unknown fields are ignored, so a deep one inside a valid charge is harmless.
    response = raw_charge(tpaga, card["id"], metadata=nested(MAX_DEPTH - 1))

    assert response.status_code == 201, response.text


@pytest.mark.parametrize("field", ["creditCard", "orderId", "description", "currency"])
def test_a_lone_surrogate_in_a_charge_string_is_a_422(tpaga: Emulator, field: str) -> None:
    card = tpaga.card()

    response = raw_charge(tpaga, card["id"], **{field: '"ab\\ud800cd"'})

    assert field_errors(response) == [("body", None)]
    assert "lone surrogate \\ud800" in response.json()["errors"][0]["message"]
    assert tpaga.ledger()["charges"] == []
    assert_still_charges(tpaga)


def test_a_lone_surrogate_is_refused_on_every_endpoint_and_stored_nowhere(tpaga: Emulator) -> None:
    card = tpaga.card()
    bodies = {
        "customer": '{"firstName":"\\udfff"}',
        "tokenize/credit_card": '{"cardHolderName":"\\ud83d"}',
        "refund/credit_card": '{"id":"\\ud800"}',
        f"customer/{card['customer']}/credit_card_token": '{"token":"\\ud800"}',
    }
    keys = {"tokenize/credit_card": DEFAULT_PUBLIC_KEY}

    for path, body in bodies.items():
        response = tpaga.post(path, data=body.encode(), headers=JSON_HEADERS, key=keys.get(path, DEFAULT_PRIVATE_KEY))
        assert field_errors(response) == [("body", None)], path
    for path, body in {
        "script": '{"creditCard":"\\ud800","outcomes":["51"]}',
        "keys": '{"privateKey":"\\ud800"}',
        "faults": '{"\\ud800":1}',
    }.items():
        response = tpaga.http.post(tpaga.base + "__sandbox/" + path, data=body.encode(), timeout=TIMEOUT)
        assert field_errors(response) == [("body", None)], path

    # The keys were not rotated and no script was stored: a normal charge on the same card still approves.
    approved = tpaga.charge(card["id"])
    assert approved.status_code == 201, approved.text


def test_a_real_non_ascii_name_is_still_accepted(tpaga: Emulator) -> None:
    response = tpaga.post("customer", {"firstName": "Zoë 😀", "lastName": "Núñez"})

    assert response.status_code == 201, response.text
    assert response.json()["firstName"] == "Zoë 😀"


def test_a_body_over_a_megabyte_is_a_413_that_says_so(tpaga: Emulator) -> None:
    big = b'{"pad":"' + b"x" * 1_100_000 + b'"}'

    response = tpaga.post("charge/credit_card", data=big, headers=JSON_HEADERS)
    control = tpaga.http.post(tpaga.base + "__sandbox/faults", data=big, timeout=TIMEOUT)

    for answer in (response, control):
        assert answer.status_code == 413
        assert "Maximum request body size" in answer.text
    assert tpaga.ledger()["charges"] == []
    assert_still_charges(tpaga)


def test_a_non_ascii_authorization_header_is_a_401(tpaga: Emulator) -> None:
    response = tpaga.http.get(
        tpaga.api + "customer/x", headers={"Authorization": "Basic \xff\xfe".encode("latin-1")}, timeout=TIMEOUT
    )

    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}
    assert_still_charges(tpaga)


# --- the clock --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"advanceSeconds": 1e308}', "advanceSeconds must be at most"),
        (b'{"advanceSeconds": 1e26}', "advanceSeconds must be at most"),
        (b'{"advanceSeconds": 1e400}', "finite"),  # Python's json reads this as inf
        pytest.param(
            b'{"advanceSeconds": ' + b"9" * 400 + b"}",
            "advanceSeconds must be at most",
            id="an-int-too-big-for-a-float",
        ),
        (b'{"advanceSeconds": NaN}', "not JSON"),
        (b'{"advanceSeconds": Infinity}', "not JSON"),
        (b'{"now": "9999-12-31T23:00:00+00:00"}', "between 2000-01-01"),
        (b'{"now": "9999-12-31T23:59:59.999999-23:59"}', "between 2000-01-01"),
        (b'{"now": "2201-01-01T00:00:00+00:00"}', "between 2000-01-01"),
    ],
)
def test_a_clock_move_out_of_range_is_a_422_and_leaves_the_clock_alone(
    tpaga: Emulator, body: bytes, message: str
) -> None:
    response = post_clock(tpaga, body)

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert message in error["message"], error
    now = datetime.fromisoformat(tpaga.look("clock")["now"])
    assert abs(now - datetime.now(UTC)) < timedelta(minutes=1)
    assert_still_charges(tpaga)


def test_the_clock_goes_up_to_the_end_of_2200_and_no_further(tpaga: Emulator) -> None:
    moved = tpaga.control("clock", {"now": "2200-12-31T23:00:00+00:00"})

    past = post_clock(tpaga, b'{"advanceSeconds": 7200}')

    assert datetime.fromisoformat(moved["now"]).year == 2200
    assert field_errors(past) == [("advanceSeconds", "7200")]
    assert "at most 3" in past.json()["errors"][0]["message"]  # about 3,599 seconds of room are left
    tpaga.control("reset")
    assert_still_charges(tpaga)


# --- a small fuzz across the whole surface ----------------------------------------------------------------


HOSTILE_VALUES = [
    "1e26",
    "1e308",
    "1e400",
    "-1e308",
    "1E+1000000000",
    "1e-400",
    "-0",
    '"abc"',
    "[]",
    "{}",
    "null",
    "true",
    '"\\u0000"',
    '"\\ud800"',
    '"' + "é" * 5_000 + '"',
    "9" * 5_000,  # more digits than Python turns into an int
    nested(100),
]


@pytest.fixture(params=["strict", "lenient"])
def either(request: pytest.FixtureRequest) -> Emulator:
    """The emulator in each mode: lenient binding converts values, so it gets its own run of the fuzz."""
    return Emulator(request.getfixturevalue("sandbox" if request.param == "strict" else "lenient_sandbox"))


def test_no_hostile_field_value_makes_any_endpoint_answer_5xx(either: Emulator) -> None:
    tpaga = either
    card = tpaga.card()
    token = tpaga.token()
    approved = tpaga.charge(card["id"]).json()["id"]
    year = FUTURE_YEAR
    tpaga_bodies: dict[str, tuple[str, dict[str, Any]]] = {
        "customer": (DEFAULT_PRIVATE_KEY, {"firstName": "A", "email": "a@b.co", "address": {"city": {}}}),
        "tokenize/credit_card": (
            DEFAULT_PUBLIC_KEY,
            {"primaryAccountNumber": "4111111111111111", "expirationMonth": "05", "expirationYear": year, "cvc": 1},
        ),
        f"customer/{card['customer']}/credit_card_token": (DEFAULT_PRIVATE_KEY, {"token": token}),
        "charge/credit_card": (
            DEFAULT_PRIVATE_KEY,
            {"creditCard": card["id"], "amount": 4500, "currency": "COP", "installments": 1, "taxAmount": 0},
        ),
        "refund/credit_card": (DEFAULT_PRIVATE_KEY, {"id": approved}),
        f"customer/{card['customer']}/credit_card": (  # the legacy raw-number card creation (lenient only)
            DEFAULT_PRIVATE_KEY,
            {
                "primaryAccountNumber": "4111111111111111",
                "expirationMonth": "05",
                "expirationYear": year,
                "cardHolderName": "A",
                "cardVerificationCode": "123",
                "billingAddress": {"city": "Bogota"},
            },
        ),
    }
    control_bodies: dict[str, dict[str, Any]] = {
        "clock": {"advanceSeconds": 1},
        "faults": {"latencyMs": 0, "errorRate": 0, "slowSeconds": 1, "nextCharges": []},
        "script": {"creditCard": card["id"], "outcomes": ["00"]},
        "keys": {"publicKey": DEFAULT_PUBLIC_KEY},
    }
    failures: list[tuple[str, str, str, int]] = []

    def send(url: str, key: str | None, good: dict[str, Any], field: str, text: str) -> None:
        parts = {name: json.dumps(value) for name, value in good.items()}
        parts[field] = text
        body = ("{" + ",".join(f"{json.dumps(n)}:{v}" for n, v in parts.items()) + "}").encode()
        auth = (key, "") if key else None
        response = tpaga.http.post(url, data=body, auth=auth, headers=JSON_HEADERS, timeout=TIMEOUT)
        if not 200 <= response.status_code < 500:
            failures.append((url.rsplit("/", 2)[-1], field, text[:20], response.status_code))
        elif response.status_code >= 400:
            assert isinstance(response.json(), dict), response.text  # Tpaga's error list, or a 401/404/406 body

    for path, (key, good) in tpaga_bodies.items():
        for field in good:
            for text in HOSTILE_VALUES:
                send(tpaga.api + path, key, good, field, text)
    for path, good in control_bodies.items():
        for field in good:
            for text in HOSTILE_VALUES:
                send(tpaga.base + "__sandbox/" + path, None, good, field, text)
                tpaga.control("reset")  # a valid key rotation or script must not leak into the next probe

    assert failures == []
    assert_still_charges(tpaga)
