"""Decline classification from Tpaga's errorCode (tpaga-api.md section 4).

Key on the code, never on the message.
"""

from __future__ import annotations

from enum import StrEnum


class DeclineClass(StrEnum):
    APPROVED = "approved"
    HARD = "hard"  # never retry on the same card; the subscription needs a new card
    SOFT = "soft"  # retry on the dunning schedule
    MERCHANT = "merchant"  # our own misconfiguration: stop and alert, do not spend the customer's attempts
    UNKNOWN = "unknown"  # the outcome is not known: never retry until resolved


APPROVED_CODES = frozenset({"00"})
HARD_CODES = frozenset({"04", "14", "41", "43", "54", "57", "62"})
SOFT_CODES = frozenset({"05", "06", "51", "61", "65", "91", "96", "T8", "N0"})
MERCHANT_CODES = frozenset({"03", "2305", "5000", "5003"})
UNKNOWN_CODES = frozenset({"9999", ""})
# Soft declines by why they happened, which decides when a retry can succeed (the colombia dunning policy).
INSUFFICIENT_FUNDS_CODES = frozenset({"51"})  # the money arrives with the salary: retry on a payday
ISSUER_UNAVAILABLE_CODES = frozenset({"06", "91", "96", "T8", "N0"})  # a system is down: retry within hours


class SoftReason(StrEnum):
    FUNDS = "funds"
    ISSUER = "issuer"
    OTHER = "other"


def normalize_code(code: object) -> str:
    """Tpaga's code as a string, zero-padded to two digits when short; None becomes ''."""
    if code is None:
        return ""
    text = str(code).strip()
    if len(text) == 1:
        text = "0" + text
    return text.upper()


def classify(code: object) -> DeclineClass:
    """Class of an errorCode; unknown-to-us codes are soft (recorded verbatim by the caller)."""
    normalized = normalize_code(code)
    if normalized in APPROVED_CODES:
        return DeclineClass.APPROVED
    if normalized in UNKNOWN_CODES:
        return DeclineClass.UNKNOWN
    if normalized in HARD_CODES:
        return DeclineClass.HARD
    if normalized in MERCHANT_CODES:
        return DeclineClass.MERCHANT
    return DeclineClass.SOFT


def soft_reason(code: object) -> SoftReason:
    """Why a soft decline happened, from its errorCode: codes not listed are `other`."""
    return _REASON_OF.get(normalize_code(code), SoftReason.OTHER)


_REASON_OF = dict.fromkeys(INSUFFICIENT_FUNDS_CODES, SoftReason.FUNDS) | dict.fromkeys(
    ISSUER_UNAVAILABLE_CODES, SoftReason.ISSUER
)
