"""The emulator's test cards (tpaga-api.md section 5) and card-number rules: Luhn, brand, outcome."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

APPROVED = "00"
UNKNOWN_CODES = frozenset({"9999", ""})

# Messages are cosmetic: clients must key on the code (tpaga-api.md section 4).
ERROR_MESSAGES: dict[str, str] = {
    "00": "Approved",
    "03": "Invalid merchant",
    "04": "Pick up card",
    "05": "Do not honor",
    "06": "Error, not processed",
    "14": "Invalid card number",
    "41": "Lost card, pick up",
    "43": "Stolen card, pick up",
    "51": "Insufficient funds",
    "54": "Expired card",
    "57": "Transaction not permitted to cardholder",
    "61": "Exceeds withdrawal amount limit",
    "62": "Restricted card",
    "65": "Exceeds withdrawal frequency limit",
    "91": "Issuer or switch inoperative",
    "96": "System malfunction",
    "9999": "Unknown outcome: the card network did not answer",
    "": "Unknown outcome",
}


def error_message(code: str) -> str:
    return ERROR_MESSAGES.get(code, "Declined")


@dataclass(frozen=True, slots=True)
class TestCard:
    """A card number whose charges follow a fixed rule."""

    __test__ = False  # not a pytest test class

    number: str
    brand: str
    # Codes of the first charges, in order; after them every charge gets `then`.
    first: tuple[str, ...] = ()
    then: str = APPROVED
    validation_code: str = APPROVED


def _declining(cc: str) -> TestCard:
    body = f"4000000000{cc}000"
    return TestCard(_with_check_digit(body), "VISA", then=cc)


def _with_check_digit(body: str) -> str:
    for digit in "0123456789":
        if luhn_ok(body + digit):
            return body + digit
    raise AssertionError("unreachable: one check digit always fits")


def luhn_ok(number: str) -> bool:
    """True when a string of digits passes the Luhn check."""
    if not number.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = ord(char) - 48
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


TEST_CARDS: dict[str, TestCard] = {
    card.number: card
    for card in (
        TestCard("4111111111111111", "VISA"),
        TestCard("4242424242424242", "VISA"),
        TestCard("5500000000000004", "MASTERCARD"),
        TestCard("378282246310005", "AMEX"),
        TestCard("4040000000000004", "VISA", then="04", validation_code="04"),
        *(_declining(code) for code in ("04", "05", "14", "41", "43", "51", "54", "61", "91", "96")),
        TestCard("4000000099990006", "VISA", then="9999"),
        TestCard("4000000000770000", "VISA", first=("51", "51"), then=APPROVED),
    )
}


def charge_code(number: str, previous_rule_charges: int) -> str:
    """The errorCode a charge gets from the test-card rule; any other valid number approves."""
    card = TEST_CARDS.get(number)
    if card is None:
        return APPROVED
    if previous_rule_charges < len(card.first):
        return card.first[previous_rule_charges]
    return card.then


def validation_code(number: str) -> str:
    """The errorCode of the validation charge run when a card is associated."""
    card = TEST_CARDS.get(number)
    return card.validation_code if card is not None else APPROVED


def brand(number: str) -> str:
    """Card brand from the number's prefix (IIN ranges); unknown prefixes are reported as VISA's peers do."""
    card = TEST_CARDS.get(number)
    if card is not None:
        return card.brand
    if number.startswith(("34", "37")):
        return "AMEX"
    if number.startswith(("36", "38", "300", "301", "302", "303", "304", "305")):
        return "DINERS"
    two = int(number[:2]) if len(number) >= 2 else 0
    four = int(number[:4]) if len(number) >= 4 else 0
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return "MASTERCARD"
    if number.startswith("4"):
        return "VISA"
    # Tpaga's enum has no "other"; Credencial is the Colombian local brand, the closest honest bucket.
    return "CREDENCIAL"


def fingerprint(number: str) -> str:
    """A stable 64-hex fingerprint: the same number always gives the same value, and it does not reveal it."""
    return hashlib.sha256(b"tpaga-sandbox-fingerprint:" + number.encode()).hexdigest()


def mask(number: str) -> str:
    """A card number safe to show: BIN and last four at most."""
    if len(number) >= 12:
        return number[:6] + "*" * (len(number) - 10) + number[-4:]
    return "*" * len(number)
