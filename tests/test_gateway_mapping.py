"""The response mapping table, model parsing and request encoding: (operation, status, body) in, outcome out."""

from __future__ import annotations

import enum
import json
import pickle
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.declines import DeclineClass
from billing.gateway import (
    Charge,
    DeclinedError,
    NotFoundError,
    OutcomeUnknownError,
    RefundRejectedError,
    TpagaError,
    UnauthorizedError,
    UnexpectedStatusError,
    ValidationError,
    map_response,
)
from billing.gateway.encoding import decimal_literal, encode_json
from billing.gateway.models import (
    CreditCard,
    Customer,
    MalformedResponseError,
    parse_charge,
    parse_credit_card,
    parse_customer,
)
from billing.gateway.operations import (
    ASSOCIATE_CARD,
    CHARGE,
    CREATE_CUSTOMER,
    GET_CARD,
    GET_CHARGE,
    GET_CUSTOMER,
    REFUND,
    TOKENIZE_CARD,
)

CARD_ID = "ifmjd9rbe8peqdjh09pln702306nfniu"


def charge_json(**overrides: Any) -> dict[str, Any]:
    """The blog's approved charge (tpaga-api.md, seed), with overrides."""
    body: dict[str, Any] = {
        "id": "1rnfu463258eph0mlqli4105mjb85kut",
        "creditCard": CARD_ID,
        "thirdPartyId": None,
        "installments": 1,
        "tpagaFeeAmount": "868.00",
        "customer": "gl01l74skk0po9afrjiaaclt0hr5acsh",
        "iacAmount": "0.00",
        "transactionInfo": {"authorizationCode": "723045", "status": "authorized"},
        "netAmount": "3545.00",
        "tipAmount": "0.00",
        "reteIvaAmount": "0.00",
        "reteIcaAmount": "19.00",
        "paid": True,
        "reteRentaAmount": "68.00",
        "paymentTransaction": "tta2hlk0e5n5dgr4kggm5j6vv8qoh3jP",
        "orderId": "BRG-2",
        "description": "One bridge in good condition.",
        "currency": "COP",
        "errorMessage": "Approved",
        "taxAmount": "0.00",
        "errorCode": "00",
        "amount": "4500.00",
    }
    body.update(overrides)
    return body


def declined(code: Any, message: str = "Declined") -> dict[str, Any]:
    return charge_json(
        paid=False,
        errorCode=code,
        errorMessage=message,
        transactionInfo={"authorizationCode": None, "status": "processor_declined"},
    )


def voided() -> dict[str, Any]:
    return charge_json(paid=False, transactionInfo={"authorizationCode": "723045", "status": "voided"})


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


CUSTOMER: dict[str, Any] = {
    "id": "cus-1",
    "firstName": "Horns and Hoofs",
    "lastName": "Perez",
    "email": "h@example.com",
}
CARD: dict[str, Any] = {
    "id": "r6ae7t2u7dmt7injv5c2bg9sqbh0krtr",
    "expirationMonth": "03",
    "lastFour": "0004",
    "bin": "404000",
    "fingerprint": "812a1abf6c03db89bdf91025687fe5a77e24065a652860445e45e62fce3a2858",
    "type": "VISA",
    "cardHolderName": "Иван Иваныч",
    "customer": "qoodmh04sh7ghpp58opn5g0hssg4slq0",
    "validationCharge": {"successful": False, "errorCode": "04"},
    "expirationYear": "2018",
}
HTML_502 = b"<html><body><h1>502 Bad Gateway</h1></body></html>"

# (id, operation, status, body, expected class, expected reason or None)
TABLE: list[tuple[str, Any, int, bytes, type[BaseException] | type, str | None]] = [
    # charge: the approved path and every way a 201 can fail to be a clear approval
    ("charge 201 approved", CHARGE, 201, dumps(charge_json()), Charge, None),
    ("charge 201 paid false", CHARGE, 201, dumps(charge_json(paid=False)), OutcomeUnknownError, "not_approved"),
    (
        "charge 201 status created",
        CHARGE,
        201,
        dumps(charge_json(transactionInfo={"status": "created"})),
        OutcomeUnknownError,
        "not_approved",
    ),
    (
        "charge 201 errorCode 05",
        CHARGE,
        201,
        dumps(charge_json(errorCode="05")),
        OutcomeUnknownError,
        "not_approved",
    ),
    ("charge 201 missing id", CHARGE, 201, dumps(without(charge_json(), "id")), OutcomeUnknownError, "malformed"),
    (
        "charge 201 missing paid",
        CHARGE,
        201,
        dumps(without(charge_json(), "paid")),
        OutcomeUnknownError,
        "malformed",
    ),
    (
        "charge 201 missing transactionInfo",
        CHARGE,
        201,
        dumps(without(charge_json(), "transactionInfo")),
        OutcomeUnknownError,
        "malformed",
    ),
    (
        "charge 201 paid as string",
        CHARGE,
        201,
        dumps(charge_json(paid="true")),
        OutcomeUnknownError,
        "malformed",
    ),
    (
        "charge 201 amount not a number",
        CHARGE,
        201,
        dumps(charge_json(amount="lots")),
        OutcomeUnknownError,
        "malformed",
    ),
    ("charge 201 truncated json", CHARGE, 201, dumps(charge_json())[:57], OutcomeUnknownError, "malformed"),
    ("charge 201 empty body", CHARGE, 201, b"", OutcomeUnknownError, "malformed"),
    ("charge 201 json list", CHARGE, 201, b"[]", OutcomeUnknownError, "malformed"),
    ("charge 201 html", CHARGE, 201, HTML_502, OutcomeUnknownError, "malformed"),
    ("charge 201 not utf-8", CHARGE, 201, b"\xff\xfe{", OutcomeUnknownError, "malformed"),
    # charge 402: a real decline, or an unknown outcome
    ("charge 402 decline 51", CHARGE, 402, dumps(declined("51")), DeclinedError, None),
    ("charge 402 decline 43", CHARGE, 402, dumps(declined("43")), DeclinedError, None),
    ("charge 402 decline int 5", CHARGE, 402, dumps(declined(5)), DeclinedError, None),
    ("charge 402 merchant 5003", CHARGE, 402, dumps(declined("5003")), DeclinedError, None),
    ("charge 402 code 9999", CHARGE, 402, dumps(declined("9999")), OutcomeUnknownError, "unknown_code"),
    ("charge 402 code empty", CHARGE, 402, dumps(declined("")), OutcomeUnknownError, "unknown_code"),
    ("charge 402 code null", CHARGE, 402, dumps(declined(None)), OutcomeUnknownError, "unknown_code"),
    ("charge 402 code 00", CHARGE, 402, dumps(declined("00")), OutcomeUnknownError, "unknown_code"),
    (
        "charge 402 paid true",
        CHARGE,
        402,
        dumps(charge_json(errorCode="51")),
        OutcomeUnknownError,
        "unknown_code",
    ),
    ("charge 402 html", CHARGE, 402, HTML_502, OutcomeUnknownError, "malformed"),
    ("charge 402 no id", CHARGE, 402, dumps(without(declined("51"), "id")), OutcomeUnknownError, "malformed"),
    # charge: server errors, odd statuses and clear rejections
    ("charge 500", CHARGE, 500, b"", OutcomeUnknownError, "server_error"),
    ("charge 502 html", CHARGE, 502, HTML_502, OutcomeUnknownError, "server_error"),
    ("charge 504", CHARGE, 504, b"{}", OutcomeUnknownError, "server_error"),
    ("charge 200", CHARGE, 200, dumps(charge_json()), OutcomeUnknownError, "malformed"),
    ("charge 302", CHARGE, 302, b"", OutcomeUnknownError, "malformed"),
    ("charge 401", CHARGE, 401, b'{"secret": "never read"}', UnauthorizedError, None),
    ("charge 404", CHARGE, 404, b"{}", NotFoundError, None),
    ("charge 422", CHARGE, 422, b'{"errors": []}', ValidationError, None),
    ("charge 406", CHARGE, 406, dumps(charge_json()), UnexpectedStatusError, None),
    ("charge 429", CHARGE, 429, b"", UnexpectedStatusError, None),
    ("charge 400", CHARGE, 400, b"", UnexpectedStatusError, None),
    # refund
    ("refund 202 voided", REFUND, 202, dumps(voided()), Charge, None),
    ("refund 202 not voided", REFUND, 202, dumps(charge_json()), OutcomeUnknownError, "not_approved"),
    ("refund 202 html", REFUND, 202, HTML_502, OutcomeUnknownError, "malformed"),
    ("refund 406 charge", REFUND, 406, dumps(voided()), RefundRejectedError, None),
    ("refund 406 html", REFUND, 406, HTML_502, RefundRejectedError, None),
    ("refund 404", REFUND, 404, b"", NotFoundError, None),
    ("refund 503", REFUND, 503, b"", OutcomeUnknownError, "server_error"),
    ("refund 200", REFUND, 200, dumps(voided()), OutcomeUnknownError, "malformed"),
    ("refund 402", REFUND, 402, dumps(declined("51")), UnexpectedStatusError, None),
    # reads and creates
    ("get charge 200 declined", GET_CHARGE, 200, dumps(declined("51")), Charge, None),
    ("get charge 200 voided", GET_CHARGE, 200, dumps(voided()), Charge, None),
    ("get charge 404", GET_CHARGE, 404, b"", NotFoundError, None),
    ("get charge 503", GET_CHARGE, 503, b"", OutcomeUnknownError, "server_error"),
    ("get charge 200 html", GET_CHARGE, 200, HTML_502, OutcomeUnknownError, "malformed"),
    ("get charge 201", GET_CHARGE, 201, dumps(charge_json()), UnexpectedStatusError, None),
    ("create customer 201", CREATE_CUSTOMER, 201, dumps(CUSTOMER), Customer, None),
    ("create customer 201 no id", CREATE_CUSTOMER, 201, b"{}", OutcomeUnknownError, "malformed"),
    ("create customer 422", CREATE_CUSTOMER, 422, b"", ValidationError, None),
    ("create customer 401", CREATE_CUSTOMER, 401, b"", UnauthorizedError, None),
    ("get customer 200", GET_CUSTOMER, 200, dumps(CUSTOMER), Customer, None),
    ("get customer 404", GET_CUSTOMER, 404, b"", NotFoundError, None),
    ("tokenize 201", TOKENIZE_CARD, 201, b'{"token": "tok_abc123", "used": false}', str, None),
    ("tokenize 201 no token", TOKENIZE_CARD, 201, b'{"used": false}', OutcomeUnknownError, "malformed"),
    ("tokenize 400", TOKENIZE_CARD, 400, b"", UnexpectedStatusError, None),
    ("tokenize 422", TOKENIZE_CARD, 422, b"", ValidationError, None),
    ("associate 201", ASSOCIATE_CARD, 201, dumps(CARD), CreditCard, None),
    (
        "associate 201 bad month",
        ASSOCIATE_CARD,
        201,
        dumps({**CARD, "expirationMonth": "March"}),
        OutcomeUnknownError,
        "malformed",
    ),
    ("associate 422", ASSOCIATE_CARD, 422, b"", ValidationError, None),
    ("get card 200", GET_CARD, 200, dumps(CARD), CreditCard, None),
    ("get card 404", GET_CARD, 404, b"", NotFoundError, None),
    ("get card 500", GET_CARD, 500, b"", OutcomeUnknownError, "server_error"),
]


@pytest.mark.parametrize(
    ("operation", "status", "body", "expected", "reason"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_map_response_table(operation: Any, status: int, body: bytes, expected: type, reason: str | None) -> None:
    if issubclass(expected, BaseException):
        with pytest.raises(expected) as caught:
            map_response(operation, status, body)
        error = caught.value
        assert isinstance(error, TpagaError)
        assert error.operation == operation.name
        if reason is not None:
            assert isinstance(error, OutcomeUnknownError)
            assert error.reason == reason
        assert error.http_status == status
    else:
        assert isinstance(map_response(operation, status, body), expected)


def test_a_declined_charge_carries_the_charge_its_code_and_class() -> None:
    with pytest.raises(DeclinedError) as caught:
        map_response(CHARGE, 402, dumps(declined("5", "Do not honor")))
    error = caught.value
    assert error.error_code == "05"
    assert error.decline_class is DeclineClass.SOFT
    assert error.charge.id == "1rnfu463258eph0mlqli4105mjb85kut"
    assert error.charge.error_message == "Do not honor"
    assert error.http_status == 402
    with pytest.raises(DeclinedError) as hard:
        map_response(CHARGE, 402, dumps(declined("43")))
    assert hard.value.decline_class is DeclineClass.HARD


def test_an_unknown_code_keeps_the_charge_id_for_a_later_lookup() -> None:
    with pytest.raises(OutcomeUnknownError) as caught:
        map_response(CHARGE, 402, dumps(declined("9999")))
    assert caught.value.charge_id == "1rnfu463258eph0mlqli4105mjb85kut"
    with pytest.raises(OutcomeUnknownError) as not_approved:
        map_response(CHARGE, 201, dumps(charge_json(paid=False)))
    assert not_approved.value.charge_id == "1rnfu463258eph0mlqli4105mjb85kut"
    with pytest.raises(OutcomeUnknownError) as html:
        map_response(CHARGE, 502, HTML_502)
    assert html.value.charge_id is None


def test_a_401_body_is_never_read_or_echoed() -> None:
    with pytest.raises(UnauthorizedError) as caught:
        map_response(GET_CHARGE, 401, b'{"message": "bad key d13fr8n7vhvkuch3lq2ds5qhjnd2pdd2"}')
    assert "d13fr8n7" not in str(caught.value)
    assert "d13fr8n7" not in repr(caught.value)


def test_validation_errors_keep_fields_but_never_the_rejected_value() -> None:
    token = "tok_0123456789abcdef"
    body = {
        "errors": [
            {
                "object": "creditCardToken",
                "field": "token",
                "rejected-value": token,
                "message": f"token {token} was already used",
            },
            {"object": "customer", "field": "email", "rejected-value": "not-an-email", "message": "invalid email"},
        ]
    }
    with pytest.raises(ValidationError) as caught:
        map_response(ASSOCIATE_CARD, 422, dumps(body))
    error = caught.value
    assert [(e.object, e.field) for e in error.errors] == [("creditCardToken", "token"), ("customer", "email")]
    assert error.errors[0].rejected_value == token  # available to code that needs it...
    assert token not in repr(error.errors)  # ...but never printed
    assert token not in str(error)
    assert token not in (error.errors[0].message or "")
    assert "token" in str(error) and "email" in str(error)


def test_a_refund_rejection_carries_the_charge_when_readable() -> None:
    with pytest.raises(RefundRejectedError) as caught:
        map_response(REFUND, 406, dumps(voided()))
    assert caught.value.charge is not None and caught.value.charge.voided
    with pytest.raises(RefundRejectedError) as unreadable:
        map_response(REFUND, 406, HTML_502)
    assert unreadable.value.charge is None


def test_no_error_message_contains_a_card_id_or_charge_id() -> None:
    for _name, operation, status, body, expected, _reason in TABLE:
        if not issubclass(expected, BaseException):
            continue
        with pytest.raises(TpagaError) as caught:
            map_response(operation, status, body)
        assert CARD_ID not in str(caught.value)
        assert "1rnfu463258eph0mlqli4105mjb85kut" not in str(caught.value)
        assert CARD_ID not in repr(caught.value)


def test_errors_survive_pickling() -> None:
    with pytest.raises(DeclinedError) as caught:
        map_response(CHARGE, 402, dumps(declined("51")))
    copy = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(copy, DeclinedError)
    assert copy.error_code == "51" and copy.charge == caught.value.charge and str(copy) == str(caught.value)
    unknown = OutcomeUnknownError("x", reason="timeout", operation="charge")
    assert pickle.loads(pickle.dumps(unknown)).reason == "timeout"


def test_outcome_unknown_refuses_an_unlisted_reason() -> None:
    with pytest.raises(ValueError, match="unknown reason"):
        OutcomeUnknownError("x", reason="maybe")  # type: ignore[arg-type]


# --- models -----------------------------------------------------------------------------------------------


def test_charge_parsing_is_exact_and_typed() -> None:
    charge = parse_charge(charge_json(dateCreated="2026-01-15T09:30:00-05:00"))
    assert charge.amount == Decimal("4500.00") and isinstance(charge.amount, Decimal)
    assert str(charge.amount) == "4500.00"
    assert charge.net_amount == Decimal("3545.00")
    assert charge.tpaga_fee_amount == Decimal("868.00")
    assert charge.currency == "COP"
    assert charge.card_id == CARD_ID
    assert charge.customer_id == "gl01l74skk0po9afrjiaaclt0hr5acsh"
    assert charge.order_id == "BRG-2"
    assert charge.status == "authorized"
    assert charge.authorization_code == "723045"
    assert charge.error_code == "00" and charge.error_message == "Approved"
    assert charge.installments == 1
    assert charge.date_created == datetime.fromisoformat("2026-01-15T14:30:00+00:00")
    assert charge.approved and not charge.voided


@pytest.mark.parametrize(
    ("raw", "normalized"), [("5", "05"), (5, "05"), ("05", "05"), ("51", "51"), ("9999", "9999"), (None, "")]
)
def test_charge_error_codes_are_zero_padded(raw: Any, normalized: str) -> None:
    assert parse_charge(declined(raw)).error_code == normalized


def test_money_parses_from_exact_json_numbers_without_float() -> None:
    body = b'{"id": "c1", "amount": 4500.10, "currency": "COP", "paid": true, ' + (
        b'"transactionInfo": {"status": "authorized"}, "errorCode": "00", "netAmount": 0.1}'
    )
    charge = map_response(CHARGE, 201, body)
    assert charge.amount == Decimal("4500.10")
    assert charge.net_amount == Decimal("0.1")


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "", "1e", True, [1]])
def test_money_rejects_non_finite_and_non_numbers(amount: Any) -> None:
    with pytest.raises(MalformedResponseError):
        parse_charge(charge_json(amount=amount))


def test_charge_tolerates_missing_optional_fields() -> None:
    minimal = {
        "id": "c1",
        "amount": "10.00",
        "currency": "COP",
        "paid": True,
        "transactionInfo": {"status": "authorized"},
    }
    charge = parse_charge({**minimal, "errorCode": "00", "dateCreated": "not a date"})
    assert charge.approved
    assert charge.installments == 1 and charge.net_amount is None and charge.date_created is None
    assert not parse_charge(minimal).approved  # no errorCode: not a clear approval


def test_voided_charge_is_not_approved() -> None:
    charge = parse_charge(voided())
    assert charge.voided and not charge.approved and charge.error_code == "00"


def test_card_parsing_reads_the_blog_sample() -> None:
    card = parse_credit_card(CARD)
    assert card.expiration_month == 3 and card.expiration_year == 2018
    assert card.brand == "VISA" and card.last_four == "0004" and card.bin == "404000"
    assert card.validation_successful is False and card.validation_error_code == "04"
    assert card.customer_id == "qoodmh04sh7ghpp58opn5g0hssg4slq0"
    no_validation = parse_credit_card({k: v for k, v in CARD.items() if k != "validationCharge"})
    assert no_validation.validation_successful is None and no_validation.validation_error_code is None


def test_customer_parsing() -> None:
    customer = parse_customer({**CUSTOMER, "merchantCustomerId": "m-1", "phone": "012345678"})
    assert customer.id == "cus-1" and customer.first_name == "Horns and Hoofs"
    assert customer.phone == "012345678" and customer.merchant_customer_id == "m-1"


def test_reprs_mask_card_ids_and_fingerprints() -> None:
    card = parse_credit_card(CARD)
    charge = parse_charge(charge_json())
    for text in (repr(card), repr(charge), str(card), str(charge)):
        assert CARD["id"] not in text
        assert CARD_ID not in text
        assert str(CARD["fingerprint"]) not in text
    assert "'…krtr'" in repr(card)
    assert "'…fniu'" in repr(charge)
    customer = parse_customer(CUSTOMER)
    assert "h@example.com" not in repr(customer)


def test_models_are_frozen() -> None:
    charge = parse_charge(charge_json())
    with pytest.raises(AttributeError):
        charge.amount = Decimal(1)  # type: ignore[misc]


# --- encoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (Decimal(4500), "4500"),
        (Decimal("4500.00"), "4500"),
        (Decimal("4500.50"), "4500.50"),
        (Decimal("0.1"), "0.1"),
        (Decimal("1E+3"), "1000"),
        (Decimal("12345678901234567890.12"), "12345678901234567890.12"),
    ],
)
def test_decimal_literals_are_exact_json_numbers(value: Decimal, literal: str) -> None:
    assert decimal_literal(value) == literal
    assert json.loads(literal, parse_float=Decimal) == value


def test_encode_json_writes_money_as_numbers() -> None:
    body = encode_json({"amount": Decimal("4500.50"), "installments": 1, "orderId": "o-1", "x": None, "b": True})
    assert body == b'{"amount":4500.50,"installments":1,"orderId":"o-1","x":null,"b":true}'
    assert json.loads(body, parse_float=Decimal)["amount"] == Decimal("4500.50")


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)))  # any text UTF-8 can carry
_JSON_SCALARS = st.none() | st.booleans() | st.integers() | _TEXT
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(_TEXT, _JSON_VALUES, max_size=6))
def test_encode_json_writes_what_json_dumps_writes_for_everything_but_money(payload: dict[str, Any]) -> None:
    # any text (quotes, backslashes, control characters, non-ASCII), ints, bools, nulls, nesting
    expected = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    assert encode_json(payload) == expected.encode("utf-8")


def test_encode_json_writes_enums_by_value() -> None:
    class Kind(enum.StrEnum):
        CARD = "card"

    class Count(enum.IntEnum):
        ONE = 1

    body = encode_json({Kind.CARD: Kind.CARD, "n": Count.ONE, "l": [Count.ONE, 'a"b']})
    assert body == b'{"card":"card","n":1,"l":[1,"a\\"b"]}'


def test_encode_json_refuses_floats_and_non_finite() -> None:
    with pytest.raises(TypeError):
        encode_json({"amount": 0.1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        encode_json({"amount": Decimal("NaN")})
