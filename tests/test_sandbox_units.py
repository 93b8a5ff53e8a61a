"""The emulator's pure parts without HTTP: test cards, money, clock, fault plan, state rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.sandbox import cards
from billing.sandbox.clock import ClockError, SandboxClock, iso, same_bogota_day
from billing.sandbox.errors import ValidationFailed
from billing.sandbox.faults import FaultPlan
from billing.sandbox.money import breakdown, money
from billing.sandbox.state import SandboxState
from billing.sandbox.validate import AssociateRequest, charge_request, customer_request, tokenize_request


def test_every_test_card_passes_the_luhn_check() -> None:
    assert all(cards.luhn_ok(number) for number in cards.TEST_CARDS)
    assert not cards.luhn_ok("4111111111111112")
    assert not cards.luhn_ok("41111a1111111111")


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4111111111111111", "VISA"),
        ("5500000000000004", "MASTERCARD"),
        ("2221000000000009", "MASTERCARD"),
        ("378282246310005", "AMEX"),
        ("36227206271667", "DINERS"),
        ("6011111111111117", "CREDENCIAL"),
    ],
)
def test_brand_comes_from_the_number_prefix(number: str, brand: str) -> None:
    assert cards.brand(number) == brand


def test_the_recovering_card_declines_twice_then_approves() -> None:
    assert [cards.charge_code("4000000000770000", n) for n in range(4)] == ["51", "51", "00", "00"]
    assert cards.charge_code("4000000000610008", 5) == "61"
    assert cards.charge_code("6011111111111117", 0) == "00"  # not a test card: approves
    assert cards.validation_code("4040000000000004") == "04"
    assert cards.validation_code("4000000000430001") == "00"


def test_masks_never_show_more_than_bin_and_last_four() -> None:
    assert cards.mask("4111111111111111") == "411111******1111"
    assert cards.mask("12345") == "*****"


def test_fingerprints_are_stable_and_do_not_contain_the_number() -> None:
    first = cards.fingerprint("4111111111111111")

    assert first == cards.fingerprint("4111111111111111") != cards.fingerprint("4242424242424242")
    assert len(first) == 64 and "4111111111111111" not in first


@pytest.mark.parametrize(
    ("amount", "fee", "net"),
    [
        ("4500", "868.00", "3545.00"),  # the blog's real sample
        ("100000", "4430.00", "93656.00"),
        ("500", "490.00", "0.00"),  # the fee is capped: net never goes negative
    ],
)
def test_fees_and_retentions_add_up_to_the_amount(amount: str, fee: str, net: str) -> None:
    result = breakdown(Decimal(amount))

    assert (money(result.fee), money(result.net)) == (fee, net)
    assert result.fee + result.rete_renta + result.rete_ica + result.rete_iva + result.net == Decimal(amount)


def test_money_is_written_with_two_decimals() -> None:
    assert money(Decimal("4500")) == "4500.00"
    assert money(Decimal("0.5")) == "0.50"


def test_the_clock_never_goes_backwards_until_reset() -> None:
    clock = SandboxClock()
    start = clock.now()

    clock.advance(3600)
    with pytest.raises(ClockError):
        clock.advance(-1)
    with pytest.raises(ClockError):
        clock.set(start)
    with pytest.raises(ClockError):
        clock.set(datetime(2099, 1, 1))  # naive
    clock.reset()

    assert clock.now() - start < timedelta(minutes=1)


def test_iso_times_are_written_in_bogota_and_same_day_uses_bogota_dates() -> None:
    late_evening = datetime(2030, 3, 11, 4, 30, tzinfo=UTC)  # 23:30 on the 10th in Bogota

    assert iso(late_evening) == "2030-03-10T23:30:00.000-05:00"
    assert same_bogota_day(late_evening, datetime(2030, 3, 10, 14, 0, tzinfo=UTC))
    assert not same_bogota_day(late_evening, datetime(2030, 3, 11, 5, 30, tzinfo=UTC))


def test_a_seeded_fault_plan_replays_and_queues_come_first() -> None:
    def draws(plan: FaultPlan) -> list[str]:
        return [plan.next_for_charge() for _ in range(50)]

    first = draws(FaultPlan(error_rate=0.2, drop_rate=0.2, garbage_rate=0.2, seed=3))
    second = draws(FaultPlan(error_rate=0.2, drop_rate=0.2, garbage_rate=0.2, seed=3))
    queued = FaultPlan(error_rate=1.0)
    queued.update({"nextCharges": ["ok", "slow"]})

    assert first == second
    assert set(first) == {"ok", "5xx", "drop", "garbage"}
    assert [queued.next_for_charge() for _ in range(3)] == ["ok", "slow", "5xx"]
    assert FaultPlan().next_for_refund() == "ok"


def test_a_bad_fault_update_changes_nothing() -> None:
    plan = FaultPlan(error_rate=0.1)

    with pytest.raises(ValidationFailed):
        plan.update({"errorRate": 0.5, "dropRate": 7})

    assert (plan.error_rate, plan.drop_rate) == (0.1, 0.0)


def _state_with_card(number: str = "4111111111111111") -> tuple[SandboxState, str]:
    state = SandboxState("private", "public")
    customer = state.create_customer(customer_request({}))
    token = state.tokenize(
        tokenize_request(
            {
                "primaryAccountNumber": number,
                "expirationMonth": "12",
                "expirationYear": str(datetime.now(UTC).year + 2),
                "cardHolderName": "Ana",
            }
        )
    )
    card = state.associate(customer.id, AssociateRequest(token.id, skip_legal_id_check=False))
    return state, card.id


def _charge_body(card_id: str) -> dict[str, object]:
    return {"creditCard": card_id, "amount": 4500, "currency": "COP", "installments": 1}


def test_state_keeps_every_charge_in_arrival_order_and_filters_the_ledger() -> None:
    state, card_id = _state_with_card()
    charges = [state.charge(charge_request({**_charge_body(card_id), "orderId": f"o-{i % 2}"})) for i in range(4)]

    everything, _ = state.ledger()
    odd, _ = state.ledger(order_id="o-1", credit_card=card_id)

    assert everything == charges
    assert odd == [charges[1], charges[3]]
    assert len({c.id for c in charges}) == 4


def test_state_refunds_inside_the_window_only_once() -> None:
    state, card_id = _state_with_card()
    charge = state.charge(charge_request(_charge_body(card_id)))

    first = state.refund(charge.id)
    second = state.refund(charge.id)

    assert (first.voided, second.voided, second.reason) == (True, False, "already voided")


def test_keys_must_differ() -> None:
    state = SandboxState("private", "public")

    with pytest.raises(ValidationFailed):
        state.set_keys(None, "private")
    assert (state.private_key, state.public_key) == ("private", "public")


def test_a_seeded_state_hands_out_the_same_ids() -> None:
    def ids() -> list[str]:
        state = SandboxState("a", "b", seed=5)
        return [state.create_customer(customer_request({})).id for _ in range(3)]

    assert ids() == ids()
