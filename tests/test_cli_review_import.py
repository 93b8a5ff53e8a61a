"""`billing review export|import`: the review queue reconciled in bulk against Tpaga's transaction report,
downloaded from the emulator (/__sandbox/report.csv) and imported through the real CLI."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from billing.db.engine import make_engine, make_session_factory
from billing.db.models import ChargeAttempt, Event, Invoice, Refund
from billing.gateway import TpagaClient
from tests.test_cli_common import PRIVATE_KEY, PUBLIC_KEY, Cli, ledger, make_cli
from tests.test_cli_ops import UNKNOWN_9999, fill_review_queue, sandbox_now, subscribe

HEADER = "orderId,chargeId,amount,currency,status,date\n"


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url)


@pytest.fixture
def clocked(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The emulator as gateway and the database test clock, moved in step with the emulator's."""
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url, api_url=sandbox.api_url, clock="database", USER="ana")


def faults(sandbox: Any, **plan: Any) -> None:
    requests.post(sandbox.base_url + "__sandbox/faults", json=plan, timeout=10).raise_for_status()


def lost_answers(cli: Cli, sandbox: Any, charged: int, not_charged: int) -> None:
    """Invoices in review: `charged` whose charge Tpaga made and whose answer was dropped, `not_charged` whose
    request Tpaga answered with a 5xx (no charge made)."""
    cli.ok("seed", "--subscriptions", str(charged + not_charged), "--cards", "approve", "--threads", "4", "--seed", "3")
    faults(sandbox, nextCharges=["drop"] * charged + ["5xx"] * not_charged)
    assert cli.json("tick", env={"TPAGA_READ_TIMEOUT": "1"})["charges"] == {"unknown": charged + not_charged}


def charge_directly(sandbox: Any, order_id: str) -> dict[str, Any]:
    """A charge made at Tpaga by someone else than this system (a restored database, another shop)."""
    with TpagaClient(sandbox.api_url, PRIVATE_KEY, PUBLIC_KEY) as client:
        customer = client.create_customer(email="orphan@example.com")
        token = client.tokenize_card(number="4111111111111111", exp_month=12, exp_year=2031, holder_name="O Test")
        card = client.associate_card(customer.id, token)
        charge = client.charge(card_id=card.id, amount=45000, currency="COP", order_id=order_id)
    return {"id": charge.id, "order_id": order_id}


def download(sandbox: Any, path: Path, start: datetime, end: datetime) -> Path:
    response = requests.get(
        sandbox.base_url + "__sandbox/report.csv",
        params={"from": start.isoformat(), "to": end.isoformat()},
        timeout=10,
    )
    response.raise_for_status()
    path.write_bytes(response.content)
    return path


def snapshot(cli: Cli) -> dict[str, Any]:
    """Everything an import could change here: events, attempt, invoice and refund states."""
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    try:
        with make_session_factory(engine)() as s:
            return {
                "events": s.execute(select(func.count()).select_from(Event)).scalar_one(),
                "attempts": dict(s.execute(select(ChargeAttempt.id, ChargeAttempt.state)).all()),
                "invoices": dict(s.execute(select(Invoice.id, Invoice.state)).all()),
                "refunds": dict(s.execute(select(Refund.id, Refund.state)).all()),
            }
    finally:
        engine.dispose()


def events_of(cli: Cli, kind: str) -> list[dict[str, Any]]:
    engine = make_engine(cli.env["DATABASE_URL"] or "")
    try:
        with make_session_factory(engine)() as s:
            rows = s.execute(select(Event).where(Event.kind == kind).order_by(Event.id)).scalars().all()
            return [{"invoice_id": e.invoice_id, "attempt_id": e.attempt_id, **e.data} for e in rows]
    finally:
        engine.dispose()


def paid_by_invoice(sandbox: Any) -> Counter[str]:
    """Approved charges at Tpaga that are not voided, by invoice (orderId inv<invoice>-a<n>)."""
    return Counter(str(c["orderId"]).split("-")[0] for c in ledger(sandbox)["charges"] if c["paid"] and not c["voided"])


def test_export_lists_what_to_search_for_in_tpagas_report(clocked: Cli, sandbox: Any, tmp_path: Path) -> None:
    lost_answers(clocked, sandbox, charged=1, not_charged=1)
    queue = clocked.json("review", "list")

    out = clocked.ok("review", "export", "--csv").stdout
    written = clocked.ok("review", "export", "--csv", "--output", str(tmp_path / "review.csv"))

    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["order_id"] for r in rows] == [q["order_id"] for q in queue]
    assert {r["amount"] for r in rows} == {"45000.00"} and {r["currency"] for r in rows} == {"COP"}
    for row in rows:
        assert datetime.fromisoformat(row["sent_at"]) <= datetime.fromisoformat(row["flagged_at"])
        assert row["charge_id_known"] == "no" and row["reason"].startswith("charge outcome unknown")
    assert (tmp_path / "review.csv").read_text() == out
    assert "2 invoice(s) in review written to" in written.stderr


def test_import_settles_the_queue_voids_the_orphan_and_a_second_import_changes_nothing(
    clocked: Cli, sandbox: Any, tmp_path: Path
) -> None:
    # Given three charges made at Tpaga whose answers were lost, two requests Tpaga refused with a 5xx, and
    # two charges nobody here made: one with an orderId of ours (a restored database), one from another shop
    start = sandbox_now(sandbox) - timedelta(minutes=1)
    lost_answers(clocked, sandbox, charged=3, not_charged=2)
    orphan = charge_directly(sandbox, "inv999-a1")
    foreign = charge_directly(sandbox, "shop-17")
    # When the operator downloads the report a few minutes later, for the range up to then
    clocked.ok("clock", "advance", "5m", "--sandbox-url", sandbox.base_url)
    end = sandbox_now(sandbox)
    report = download(sandbox, tmp_path / "transactions.csv", start, end)
    command = ["review", "import", str(report), "--from", start.isoformat(), "--to", end.isoformat()]

    # A dry run says what would happen and does nothing
    before = snapshot(clocked)
    dry = json.loads(clocked.ok(*command, "--dry-run", "--json").stdout)
    assert (dry["dry_run"], dry["to_verify"], dry["not_charged"], dry["orphans_to_void"]) == (True, 3, 2, 1)
    assert snapshot(clocked) == before and not any(c["voided"] for c in ledger(sandbox)["charges"])

    # And then imports it
    done = json.loads(clocked.ok(*command, "--reason", "crash of 10:02", "--json").stdout)

    # Then the lost answers are paid, the refused ones are not charged, the orphan is voided, the other shop's
    # charge is listed for a person and left alone, and the queue is empty
    assert done["settled"] == {"approved": 3, "not_charged": 2}
    assert [v["charge_id"] for v in done["orphans_voided"]] == [orphan["id"]]
    assert [(d["kind"], d["charge_id"]) for d in done["discrepancies"]] == [("foreign", foreign["id"])]
    assert done["left_in_review"] == [] and done["in_review"] == 0
    book = {c["id"]: c for c in ledger(sandbox)["charges"]}
    assert book[orphan["id"]]["voided"] is True and book[foreign["id"]]["voided"] is False
    assert clocked.json("status")["invoices"] == {"paid": 3, "open": 2}
    # Every change carries who and why, and the report's fingerprint
    actions = events_of(clocked, "operator.action")
    assert Counter(a["action"] for a in actions) == {"review.import": 5, "charge.void_orphan": 1}
    assert {(a["by"], a["reason"], a["report"]) for a in actions} == {("ana", "crash of 10:02", "transactions.csv")}
    [summary] = events_of(clocked, "review.imported")
    assert summary["settled"] == {"approved": 3, "not_charged": 2} and summary["orphans_voided"] == [orphan["id"]]

    # And billing goes on: the two not charged are charged once, so every invoice holds exactly one approval
    assert clocked.json("tick")["charges"] == {"approved": 2}
    assert clocked.json("status")["invoices"] == {"paid": 5}
    paid = paid_by_invoice(sandbox)
    assert set(paid.values()) == {1} and len(paid) == 6  # five invoices, and the other shop's charge

    # And importing the same report again changes nothing
    after = snapshot(clocked)
    again = clocked.ok(*command)
    assert snapshot(clocked) == after
    assert "settled      0" in again.stdout and "(1 already voided)" in again.stdout
    assert "0 in review now: the queue is empty" in again.stdout


def test_an_attempt_flagged_too_close_to_the_reports_end_stays_in_review(
    clocked: Cli, sandbox: Any, tmp_path: Path
) -> None:
    """Tpaga's clock may differ from ours: a request that may have arrived within the margin of the report's end
    could be in the next report, so it is not declared uncharged."""
    start = sandbox_now(sandbox) - timedelta(minutes=1)
    lost_answers(clocked, sandbox, charged=0, not_charged=1)
    report = download(sandbox, tmp_path / "r.csv", start, sandbox_now(sandbox) + timedelta(seconds=1))

    out = clocked.ok(
        "review",
        "import",
        str(report),
        "--from",
        start.isoformat(),
        "--to",
        (sandbox_now(sandbox) + timedelta(seconds=1)).isoformat(),
    ).stdout

    assert "outside_range" in out and "1 in review now" in out
    assert clocked.json("status")["invoices"] == {"review": 1}


def test_an_unknown_attempt_whose_charge_id_is_known_is_looked_up(clocked: Cli, sandbox: Any, tmp_path: Path) -> None:
    """Tpaga answered 9999 with a charge id: the report does not need a row for it, the GET settles what it can."""
    subscribe(clocked, sandbox, UNKNOWN_9999)
    assert clocked.json("tick")["charges"] == {"unknown": 1}
    report = tmp_path / "empty.csv"
    report.write_text(HEADER)

    done = json.loads(clocked.ok("review", "import", str(report), "--json").stdout)

    # Tpaga's own record of a 9999 is not final: it stays for a person, said so.
    assert [i["kind"] for i in done["left_in_review"]] == ["still_unknown"] and done["settled"] == {}


# --- the report's format ---------------------------------------------------------------------------------


def test_a_dashboard_export_with_its_own_column_names_is_read_through_columns(
    clocked: Cli, sandbox: Any, tmp_path: Path
) -> None:
    start = sandbox_now(sandbox) - timedelta(minutes=1)
    lost_answers(clocked, sandbox, charged=1, not_charged=0)
    [charge] = ledger(sandbox)["charges"]
    # A Spanish spreadsheet: ';' between columns, a byte-order mark, local time without an offset, extra columns
    local = datetime.fromisoformat(charge["dateCreated"]).replace(tzinfo=None).isoformat(sep=" ")
    report = tmp_path / "Transacciones.csv"
    report.write_bytes(
        (
            "\ufeffReferencia;ID transacción;Valor;Estado;Fecha;Franquicia\n"
            f"{charge['orderId']};{charge['id']};45000.00;authorized;{local};VISA\n"
        ).encode()
    )
    mapping = "orderId=Referencia,chargeId=ID transacción,amount=Valor,status=Estado,date=Fecha"

    done = json.loads(
        clocked.ok("review", "import", str(report), "--columns", mapping, "--from", start.isoformat(), "--json").stdout
    )

    assert done["settled"] == {"approved": 1} and done["in_review"] == 0


def write(tmp_path: Path, text: str | bytes, name: str = "report.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


ROW = "inv1-a1,c1,45000.00,COP,authorized,2026-03-10T08:00:00-05:00\n"


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("", (), "report.csv is empty: expected a header line"),
        ("orderId,amount,status,date\n", (), "report.csv has no column 'chargeId'; its columns are 'orderId', "),
        (
            HEADER,
            ("--columns", "orderId=Referencia"),
            "has no column 'Referencia' (for orderId); its columns are",
        ),
        (HEADER, ("--columns", "order=Referencia"), "--columns: unknown field 'order'; the fields are orderId, "),
        (HEADER, ("--columns", "orderId"), "--columns: 'orderId' is not FIELD=COLUMN"),
        (HEADER, ("--columns", "orderId=date"), "--columns: column 'date' is given to two fields"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", (), "report.csv is not a CSV file (it holds binary data)"),
        (b"orderId,chargeId\n\xff\xfe\n", (), "report.csv is not UTF-8 text (byte 17)"),
        (HEADER + "inv1-a1,c1,45000.00\n", (), "report.csv, line 2: 3 fields, the header has 6"),
        (HEADER + ROW.replace("45000.00", '"45.000,00"'), (), "line 2: amount '45.000,00' is not a decimal number"),
        (HEADER + ROW.replace("45000.00", "0"), (), "line 2: amount '0' is not positive"),
        (HEADER + ROW.replace("authorized", "Aprobada"), (), "line 2: status 'Aprobada' is not one of authorized, "),
        (HEADER + ROW.replace("2026-03-10T08:00:00-05:00", "10/03/2026"), (), "line 2: date '10/03/2026' is not"),
        (HEADER + ROW.replace(",c1,", ",,"), (), "line 2: the charge id is empty"),
        (HEADER + '"inv1-a1,c1\n', (), "report.csv, line 2: not CSV"),
        (HEADER + ROW + ROW.replace("45000.00", "1.00"), (), "charge c1 is on lines 2 and 3 with other values"),
        (
            HEADER + ROW,
            ("--from", "2026-03-11T00:00:00-05:00"),
            "line 2: charge c1 of 2026-03-10T08:00:00-05:00 is outside the range given",
        ),
        # Without an offset a bound is Colombian time, as the dashboard's range is: 08:30 there is after the row.
        (HEADER + ROW, ("--from", "2026-03-10T08:30:00"), "is outside the range given"),
    ],
)
def test_a_report_that_cannot_be_read_is_refused_whole_with_a_clean_message(
    cli: Cli, tmp_path: Path, content: str | bytes, extra: tuple[str, ...], message: str
) -> None:
    before = snapshot(cli)
    cli.fails("review", "import", write(tmp_path, content), *extra, match=message)
    assert snapshot(cli) == before


def test_import_refuses_bad_options_before_reading_anything(cli: Cli, tmp_path: Path) -> None:
    report = write(tmp_path, HEADER + ROW)
    cli.fails(
        "review",
        "import",
        str(tmp_path / "nope.csv"),
        match="'" + str(tmp_path / "nope.csv") + "' does not exist",
        code=2,
    )
    cli.fails("review", "import", str(tmp_path), match="is a directory", code=2)
    cli.fails("review", "import", report, "--from", "monday", match="is not an ISO 8601 date or time", code=2)
    cli.fails(
        "review", "import", report, "--from", "2026-03-11", "--to", "2026-03-10", match="must be after --from", code=2
    )
    cli.fails("review", "import", report, "--clock-margin", "soon", match="is not a duration", code=2)
    cli.fails("review", "import", report, "--by", " ", match="--by must be a non-empty string", code=2)
    cli.fails("review", "import", report, "--reason", "a\nb", match="--reason must not contain control", code=2)
    cli.fails("review", "import", match="Missing argument 'REPORT'", code=2)


def test_an_empty_report_without_a_range_settles_nothing(gw_queue: Cli, tmp_path: Path) -> None:
    out = gw_queue.ok("review", "import", write(tmp_path, HEADER)).stdout
    assert "no time range (give --from and --to)" in out and "2 in review now" in out


@pytest.fixture
def gw_queue(sqlite_url: str, sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    cli = make_cli(sqlite_url, api_url=sandbox.api_url)
    fill_review_queue(cli, sandbox, 2)
    return cli
