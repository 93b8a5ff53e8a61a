"""The emulator's own surface (/__sandbox/): ledger, stats, faults, clock, scripts, keys, reset."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests

from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, SandboxThread
from tests.test_sandbox_support import Emulator, field_errors


@pytest.fixture
def tpaga(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


# --- ledger and stats ------------------------------------------------------------------------------------


def test_the_ledger_filters_by_order_id_and_card(tpaga: Emulator) -> None:
    a, b = tpaga.card(), tpaga.card("4000000000510000")
    tpaga.charge(a["id"], orderId="inv-1")
    tpaga.charge(a["id"], orderId="inv-2")
    tpaga.charge(b["id"], orderId="inv-1")

    by_order = tpaga.ledger(orderId="inv-1")["charges"]
    by_card = tpaga.ledger(creditCard=a["id"])["charges"]
    both = tpaga.ledger(orderId="inv-1", creditCard=b["id"])["charges"]

    assert [(c["creditCard"], c["paid"]) for c in by_order] == [(a["id"], True), (b["id"], False)]
    assert [c["orderId"] for c in by_card] == ["inv-1", "inv-2"]
    assert [(c["errorCode"], c["status"]) for c in both] == [("51", "processor_declined")]
    assert set(by_order[0]) >= {
        "id",
        "orderId",
        "creditCard",
        "customer",
        "amount",
        "currency",
        "paid",
        "status",
        "errorCode",
        "dateCreated",
        "voided",
        "delivery",
    }
    assert by_order[0]["amount"] == "4500.00" and by_order[0]["delivery"] == "ok"


def test_stats_count_requests_charges_and_refunds(tpaga: Emulator) -> None:
    card = tpaga.card()
    approved = tpaga.charge(card["id"]).json()
    tpaga.charge(tpaga.card("4000000000050007")["id"])
    tpaga.refund(approved["id"])
    tpaga.post("customer", {}, key="wrong")

    stats = tpaga.look("stats")

    assert stats["requests"]["POST charge/credit_card"] == 2
    assert stats["requests"]["POST customer"] == 3
    assert stats["charges"]["approved"] == 1 and stats["charges"]["declined"] == 1
    assert stats["refunds"]["voided"] == 1
    assert stats["faults"] == {"5xx": 0, "drop": 0, "garbage": 0, "slow": 0}


# --- faults ----------------------------------------------------------------------------------------------------


def test_a_5xx_fault_makes_no_charge_and_alternates_502_and_504(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.faults(nextCharges=["5xx", "5xx"])

    first = tpaga.charge(card["id"], orderId="inv-5")
    second = tpaga.charge(card["id"], orderId="inv-5")

    assert (first.status_code, second.status_code) == (502, 504)
    assert "text/html" in first.headers["Content-Type"]
    assert tpaga.ledger(orderId="inv-5")["charges"] == []
    assert tpaga.look("stats")["faults"]["5xx"] == 2


def test_a_dropped_charge_is_made_once_and_the_client_sees_a_connection_error(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.faults(nextCharges=["drop"])

    with pytest.raises(requests.ConnectionError):
        tpaga.charge(card["id"], orderId="inv-drop")

    (entry,) = tpaga.ledger(orderId="inv-drop")["charges"]
    assert (entry["paid"], entry["delivery"]) == (True, "dropped")
    assert tpaga.charge(card["id"]).status_code == 201  # the next request is served normally


def test_garbage_answers_alternate_an_html_502_and_truncated_json(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.faults(nextCharges=["garbage", "garbage"])

    html = tpaga.charge(card["id"], orderId="inv-g")
    truncated = tpaga.charge(card["id"], orderId="inv-g")

    assert html.status_code == 502 and html.text.lstrip().startswith("<html>")
    assert truncated.status_code == 201
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.text)
    entries = tpaga.ledger(orderId="inv-g")["charges"]
    assert [(e["paid"], e["delivery"]) for e in entries] == [(True, "garbage"), (True, "garbage")]


def test_next_charges_apply_in_order_before_random_rates(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.faults(nextCharges=["ok", "5xx", "ok"], errorRate=1.0)

    statuses = [tpaga.charge(card["id"]).status_code for _ in range(4)]

    assert statuses[:3] == [201, 502, 201]
    assert statuses[3] in (502, 504)  # the queue is empty: errorRate 1.0 takes over
    assert tpaga.faults()["nextCharges"] == []


def test_a_slow_charge_is_made_while_a_short_read_timeout_gives_up(sandbox_factory: Any) -> None:
    server = sandbox_factory()
    tpaga = Emulator(server)
    card = tpaga.card()
    tpaga.faults(nextCharges=["slow"])

    with pytest.raises(requests.ReadTimeout):
        tpaga.charge(card["id"], orderId="inv-slow", timeout=(2, 0.3))

    (entry,) = tpaga.ledger(orderId="inv-slow")["charges"]
    assert entry["paid"] is True
    assert tpaga.look("stats")["faults"]["slow"] == 1
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3  # the 30 s sleep does not hold up shutdown


def test_slow_seconds_can_be_shortened_so_the_real_answer_arrives(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.faults(nextCharges=["slow"], slowSeconds=0.2)

    started = time.monotonic()
    response = tpaga.charge(card["id"])

    assert response.status_code == 201
    assert time.monotonic() - started >= 0.2


def test_refund_faults_drop_after_the_void_is_made(tpaga: Emulator) -> None:
    charge = tpaga.charge(tpaga.card()["id"]).json()
    tpaga.faults(nextRefunds=["drop"])

    with pytest.raises(requests.ConnectionError):
        tpaga.refund(charge["id"])

    assert tpaga.refund(charge["id"]).status_code == 406  # already voided
    refunds = tpaga.ledger()["refunds"]
    assert [(r["outcome"], r["delivery"]) for r in refunds] == [("voided", "dropped"), ("refused", "ok")]


def test_a_refund_5xx_makes_no_void(tpaga: Emulator) -> None:
    charge = tpaga.charge(tpaga.card()["id"]).json()
    tpaga.faults(nextRefunds=["5xx"])

    assert tpaga.refund(charge["id"]).status_code == 502
    assert tpaga.refund(charge["id"]).status_code == 202


def test_random_faults_follow_the_rates(sandbox_factory: Any) -> None:
    tpaga = Emulator(sandbox_factory(drop_rate=1.0, seed=7))
    card = tpaga.card()  # latency and faults never touch customer, tokenize or associate

    with pytest.raises(requests.ConnectionError):
        tpaga.charge(card["id"], orderId="r")

    assert [e["delivery"] for e in tpaga.ledger(orderId="r")["charges"]] == ["dropped"]


def test_a_fixed_seed_replays_the_same_faults(sandbox_factory: Any) -> None:
    def run() -> list[int]:
        tpaga = Emulator(sandbox_factory(error_rate=0.5, seed=42))
        card = tpaga.card()
        return [tpaga.charge(card["id"]).status_code for _ in range(12)]

    first, second = run(), run()

    assert first == second
    assert {201} < set(first)


def test_latency_delays_every_api_request(tpaga: Emulator) -> None:
    tpaga.faults(latencyMs=150)

    started = time.monotonic()
    tpaga.post("customer", {}, key="wrong")

    assert time.monotonic() - started >= 0.15
    assert tpaga.faults()["latencyMs"] == 150


def test_fault_updates_are_partial_and_validated(tpaga: Emulator) -> None:
    tpaga.faults(errorRate=0.25)
    tpaga.faults(dropRate=0.5)

    bad = tpaga.control_raw("faults", {"errorRate": 2, "nextCharges": ["boom"], "latencyMs": -1})

    assert sorted(f for f, _ in field_errors(bad)) == ["errorRate", "latencyMs", "nextCharges"]
    state = tpaga.look("faults")
    assert (state["errorRate"], state["dropRate"], state["garbageRate"]) == (0.25, 0.5, 0.0)


# --- clock -------------------------------------------------------------------------------------------------------


def test_the_clock_moves_forward_and_never_back(tpaga: Emulator) -> None:
    before = datetime.fromisoformat(tpaga.look("clock")["now"])

    advanced = datetime.fromisoformat(tpaga.control("clock", {"advanceSeconds": 3600})["now"])
    target = (advanced + timedelta(days=2)).isoformat()
    moved = datetime.fromisoformat(tpaga.control("clock", {"now": target})["now"])

    assert timedelta(hours=1) <= advanced - before < timedelta(hours=1, minutes=1)
    assert moved - datetime.fromisoformat(target) < timedelta(seconds=5)
    assert field_errors(tpaga.control_raw("clock", {"now": before.isoformat()})) == [("now", before.isoformat())]
    assert field_errors(tpaga.control_raw("clock", {"advanceSeconds": -1})) == [("advanceSeconds", "-1")]
    assert tpaga.control_raw("clock", {}).status_code == 422
    assert tpaga.control_raw("clock", {"now": "2030-01-01T00:00:00"}).status_code == 422  # no offset


def test_date_created_follows_the_emulator_clock(tpaga: Emulator) -> None:
    tpaga.control("clock", {"advanceSeconds": 10 * 86400})
    charge = tpaga.charge(tpaga.card()["id"]).json()

    now = datetime.fromisoformat(tpaga.look("clock")["now"])

    assert abs(datetime.fromisoformat(charge["dateCreated"]) - now) < timedelta(seconds=5)


# --- scripted outcomes -----------------------------------------------------------------------------------------


def test_a_script_for_a_card_id_sets_its_next_outcomes_then_the_card_rule_returns(tpaga: Emulator) -> None:
    card = tpaga.card()
    tpaga.control("script", {"creditCard": card["id"], "outcomes": ["51", "51", "00"]})

    codes = [tpaga.charge(card["id"]).json()["errorCode"] for _ in range(4)]

    assert codes == ["51", "51", "00", "00"]


def test_a_script_for_a_card_number_covers_every_card_with_that_number(tpaga: Emulator) -> None:
    card = tpaga.card("4000000000510000")
    tpaga.control("script", {"primaryAccountNumber": "4000000000510000", "outcomes": ["00", "9999", "", "5"]})

    responses = [tpaga.charge(card["id"]) for _ in range(5)]

    assert [(r.status_code, r.json()["errorCode"]) for r in responses] == [
        (201, "00"),
        (402, "9999"),
        (402, ""),
        (402, "05"),
        (402, "51"),
    ]
    assert tpaga.look("stats")["charges"]["unknown"] == 2


def test_a_script_needs_a_known_card_and_a_list_of_codes(tpaga: Emulator) -> None:
    assert field_errors(tpaga.control_raw("script", {"creditCard": "nope", "outcomes": ["00"]})) == [
        ("creditCard", "nope")
    ]
    assert tpaga.control_raw("script", {"outcomes": ["00"]}).status_code == 422
    assert (
        tpaga.control_raw("script", {"primaryAccountNumber": "4111111111111111", "outcomes": "00"}).status_code == 422
    )


# --- keys and reset ----------------------------------------------------------------------------------------------


def test_rotated_keys_revoke_the_old_ones(tpaga: Emulator) -> None:
    tpaga.control("keys", {"privateKey": "new-private", "publicKey": "new-public"})

    assert tpaga.post("customer", {}).status_code == 401
    assert tpaga.post("customer", {}, key="new-private").status_code == 201
    assert tpaga.tokenize().status_code == 401
    assert tpaga.post("tokenize/credit_card", {}, key="new-public").status_code == 422  # authenticated
    assert tpaga.control_raw("keys", {"publicKey": "new-private"}).status_code == 422


def test_reset_clears_state_faults_clock_and_keys(tpaga: Emulator) -> None:
    customer = tpaga.customer()
    tpaga.charge(tpaga.card()["id"])
    tpaga.faults(errorRate=1.0, nextCharges=["drop"])
    tpaga.control("clock", {"advanceSeconds": 86400 * 30})
    tpaga.control("keys", {"privateKey": "rotated"})

    tpaga.control("reset")

    assert tpaga.get(f"customer/{customer['id']}").status_code == 404
    assert tpaga.ledger() == {"charges": [], "refunds": []}
    faults = tpaga.look("faults")
    assert (faults["errorRate"], faults["nextCharges"]) == (0.0, [])
    assert datetime.fromisoformat(tpaga.look("clock")["now"]) - datetime.now().astimezone() < timedelta(minutes=1)
    assert tpaga.look("stats")["charges"]["approved"] == 0


def test_reset_restores_the_configured_faults_and_keys(sandbox_factory: Any) -> None:
    tpaga = Emulator(sandbox_factory(private_key="custom", latency_ms=5, garbage_rate=0.1))
    tpaga.faults(latencyMs=0, garbageRate=0.0)
    tpaga.control("keys", {"privateKey": "other"})

    tpaga.control("reset")

    faults = tpaga.look("faults")
    assert (faults["latencyMs"], faults["garbageRate"]) == (5, 0.1)
    assert tpaga.post("customer", {}, key="custom").status_code == 201
    assert tpaga.post("customer", {}, key=DEFAULT_PRIVATE_KEY).status_code == 401


def test_control_bodies_must_be_json_objects(tpaga: Emulator) -> None:
    response = requests.post(tpaga.base + "__sandbox/faults", data=b"{", timeout=10)

    assert response.status_code == 422


# --- the Python API ---------------------------------------------------------------------------------------------


def test_sandbox_thread_picks_a_free_port_and_works_as_a_context_manager() -> None:
    with SandboxThread(SandboxConfig()) as server:
        reset_url = server.base_url + "__sandbox/reset"
        assert server.base_url == f"http://127.0.0.1:{server.port}/"
        assert server.api_url == server.base_url + "api/"
        response = requests.post(server.api_url + "customer", json={}, auth=(DEFAULT_PRIVATE_KEY, ""), timeout=10)
        assert response.status_code == 201

    with pytest.raises(requests.ConnectionError):
        requests.post(reset_url, timeout=2)


def test_a_bad_config_is_refused_before_starting() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SandboxThread(SandboxConfig(error_rate=1.5))
    with pytest.raises(ValueError, match="differ"):
        SandboxThread(SandboxConfig(private_key=DEFAULT_PUBLIC_KEY))


def test_a_port_in_use_fails_start(sandbox: SandboxThread) -> None:
    with pytest.raises(OSError):
        SandboxThread(SandboxConfig(port=sandbox.port)).start()


def test_stop_does_not_wait_for_a_slow_answer_a_client_still_waits_for(sandbox_factory: Any) -> None:
    server = sandbox_factory()
    tpaga = Emulator(server)
    card = tpaga.card()
    tpaga.faults(nextCharges=["slow"])
    outcome: list[BaseException | int] = []

    def charge() -> None:
        try:
            outcome.append(tpaga.charge(card["id"], timeout=(2, 20)).status_code)
        except requests.RequestException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=charge)
    waiter.start()
    deadline = time.monotonic() + 5
    while not tpaga.look("stats")["faults"]["slow"] and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    waiter.join(10)

    assert time.monotonic() - started < 3
    assert len(outcome) == 1 and isinstance(outcome[0], requests.ConnectionError)
