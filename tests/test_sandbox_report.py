"""The emulator's transaction report (/__sandbox/report.csv): the merchant dashboard's export, for any time range,
in the format `billing review import` reads."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

import pytest
import requests

from billing.sandbox import SandboxThread
from billing.services.tpaga_report import read_report
from tests.test_sandbox_support import Emulator, field_errors


@pytest.fixture
def tpaga(sandbox: SandboxThread) -> Emulator:
    return Emulator(sandbox)


def report(tpaga: Emulator, **params: str) -> requests.Response:
    return requests.get(tpaga.base + "__sandbox/report.csv", params=params, timeout=10)


def now(tpaga: Emulator) -> datetime:
    return datetime.fromisoformat(tpaga.http.get(tpaga.base + "__sandbox/clock", timeout=10).json()["now"])


def test_the_report_lists_every_charge_of_the_range_with_its_status_now(tpaga: Emulator) -> None:
    card, declining = tpaga.card(), tpaga.card("4000000000510000")
    before = now(tpaga)
    paid = tpaga.charge(card["id"], 45000, orderId="inv1-a1").json()
    tpaga.charge(declining["id"], 12000, orderId="inv2-a1")
    voided = tpaga.charge(card["id"], 100, orderId="inv3-a1").json()
    tpaga.refund(voided["id"])
    tpaga.charge(card["id"])  # no orderId
    tpaga.control("clock", {"advanceSeconds": 3600})
    later = tpaga.charge(card["id"], orderId="inv4-a1").json()

    everything = report(tpaga)
    first_hour = report(tpaga, **{"from": before.isoformat(), "to": (before + timedelta(minutes=30)).isoformat()})

    assert everything.status_code == 200 and everything.headers["Content-Type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(everything.text)))
    assert [(r["orderId"], r["status"], r["errorCode"], r["amount"]) for r in lines] == [
        ("inv1-a1", "authorized", "00", "45000.00"),
        ("inv2-a1", "processor_declined", "51", "12000.00"),
        ("inv3-a1", "voided", "00", "100.00"),
        ("", "authorized", "00", "4500.00"),
        ("inv4-a1", "authorized", "00", "4500.00"),
    ]
    assert lines[0]["chargeId"] == paid["id"] and lines[0]["currency"] == "COP"
    assert lines[0]["date"] == paid["dateCreated"]  # Tpaga's own time, with its offset
    assert [r["orderId"] for r in csv.DictReader(io.StringIO(first_hour.text))] == ["inv1-a1", "inv2-a1", "inv3-a1", ""]
    # The range is [from, to): a charge dated exactly at `to` belongs to the next report.
    at_later = datetime.fromisoformat(later["dateCreated"])
    assert "inv4-a1" not in report(tpaga, to=at_later.isoformat()).text
    assert "inv4-a1" in report(tpaga, **{"from": at_later.isoformat()}).text


def test_the_report_is_what_billing_review_import_reads_by_default(tpaga: Emulator) -> None:
    card = tpaga.card()
    charge = tpaga.charge(card["id"], 45000, orderId="inv7-a2").json()

    [row] = read_report(report(tpaga).text, "transactions.csv")

    assert (row.order_id, row.charge_id, str(row.amount), row.currency, row.status) == (
        "inv7-a2",
        charge["id"],
        "45000.00",
        "COP",
        "authorized",
    )
    assert row.date == datetime.fromisoformat(charge["dateCreated"])


def test_an_empty_range_is_a_header_line_alone(tpaga: Emulator) -> None:
    assert report(tpaga).text == "orderId,chargeId,amount,currency,status,errorCode,date\r\n"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-01-01T00:00:00"}, "to"),  # no offset: whose midnight?
        ({"from": "2026-02-01T00:00:00+00:00", "to": "2026-01-01T00:00:00+00:00"}, "to"),
    ],
)
def test_a_bad_range_is_a_422_naming_the_parameter(tpaga: Emulator, params: dict[str, str], field: str) -> None:
    assert [f for f, _ in field_errors(report(tpaga, **params))] == [field]
