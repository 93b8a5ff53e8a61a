"""Decline classification keys on Tpaga's errorCode (tpaga-api.md section 4), never on the message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.domain.declines import (
    APPROVED_CODES,
    HARD_CODES,
    MERCHANT_CODES,
    SOFT_CODES,
    UNKNOWN_CODES,
    DeclineClass,
    classify,
    normalize_code,
)

# tpaga-api.md section 4, row by row
SECTION_4 = [
    ("00", DeclineClass.APPROVED),  # approved
    ("04", DeclineClass.HARD),  # pick up card
    ("05", DeclineClass.SOFT),  # do not honor
    ("06", DeclineClass.SOFT),  # error, not processed
    ("14", DeclineClass.HARD),  # invalid card number
    ("41", DeclineClass.HARD),  # lost card
    ("43", DeclineClass.HARD),  # stolen card
    ("51", DeclineClass.SOFT),  # insufficient funds
    ("54", DeclineClass.HARD),  # expired card
    ("57", DeclineClass.HARD),  # not permitted
    ("62", DeclineClass.HARD),  # restricted card
    ("61", DeclineClass.SOFT),  # exceeds amount limit
    ("65", DeclineClass.SOFT),  # exceeds frequency limit
    ("91", DeclineClass.SOFT),  # issuer or switch unavailable
    ("96", DeclineClass.SOFT),
    ("T8", DeclineClass.SOFT),
    ("N0", DeclineClass.SOFT),
    ("03", DeclineClass.MERCHANT),  # merchant misconfigured
    ("2305", DeclineClass.MERCHANT),
    ("5000", DeclineClass.MERCHANT),
    ("5003", DeclineClass.MERCHANT),
    ("9999", DeclineClass.UNKNOWN),  # outcome unknown
    ("", DeclineClass.UNKNOWN),
]


@pytest.mark.parametrize(("code", "expected"), SECTION_4)
def test_every_code_in_the_tpaga_table_has_its_documented_class(code: str, expected: DeclineClass) -> None:
    assert classify(code) is expected


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("00", "00"),
        ("5", "05"),
        ("0", "00"),
        (5, "05"),
        (0, "00"),
        (51, "51"),
        (9999, "9999"),
        (" 51 ", "51"),
        ("t8", "T8"),
        ("n0", "N0"),
        ("", ""),
        (None, ""),
        ("2305", "2305"),
    ],
)
def test_normalize_code_zero_pads_short_codes_and_turns_none_into_empty(raw: object, normalized: str) -> None:
    assert normalize_code(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, DeclineClass.APPROVED),
        ("0", DeclineClass.APPROVED),
        (4, DeclineClass.HARD),
        ("5", DeclineClass.SOFT),
        (3, DeclineClass.MERCHANT),
        (9999, DeclineClass.UNKNOWN),
        (None, DeclineClass.UNKNOWN),
        ("   ", DeclineClass.UNKNOWN),
        ("t8", DeclineClass.SOFT),
    ],
)
def test_classify_normalizes_before_looking_the_code_up(raw: object, expected: DeclineClass) -> None:
    assert classify(raw) is expected


@pytest.mark.parametrize("code", ["01", "12", "99", "Z3", "7777", "000", "abc"])
def test_a_code_we_do_not_know_is_soft(code: str) -> None:
    assert classify(code) is DeclineClass.SOFT


def test_the_code_sets_do_not_overlap() -> None:
    sets = [APPROVED_CODES, HARD_CODES, SOFT_CODES, MERCHANT_CODES, UNKNOWN_CODES]
    assert sum(len(s) for s in sets) == len(frozenset().union(*sets))


@given(code=st.text(max_size=6))
def test_every_string_gets_exactly_one_class_and_normalizing_twice_changes_nothing(code: str) -> None:
    assert classify(code) in DeclineClass
    assert normalize_code(normalize_code(code)) == normalize_code(code)
    assert classify(normalize_code(code)) is classify(code)
