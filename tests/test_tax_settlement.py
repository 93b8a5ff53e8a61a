"""Issue 17 items 1 and 2 end to end: a plan's tax reaches Tpaga in taxAmount (IVA) or iacAmount (INC) over real
HTTP, Tpaga's settlement figures are stored on each approved attempt as the emulator returned them, and
`billing report --settlement` adds them up per day to the peso. State changes run on PostgreSQL; bad input
(an unknown tax treatment, a rate the treatment does not allow) is refused and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, update

from billing.db.models import ChargeAttempt, Command, Invoice, Plan
from billing.gateway import TpagaClient
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, SandboxThread
from billing.services import catalog, commands, invoicing, refunds, reports, voids
from billing.services.charging import charge_invoice
from billing.services.errors import InvalidRequest
from tests.test_cli_common import Cli, make_cli
from tests.test_money_path_charges import APPROVES, World, make_world

FIGURES = {
    "tax_amount_minor": "taxAmount",
    "iac_amount_minor": "iacAmount",
    "fee_minor": "tpagaFeeAmount",
    "rete_renta_minor": "reteRentaAmount",
    "rete_ica_minor": "reteIcaAmount",
    "rete_iva_minor": "reteIvaAmount",
    "net_minor": "netAmount",
}


def minor(text: str) -> int:
    """Tpaga's two-decimal string as minor units, computed here independently of the product's parser."""
    value = Decimal(text) * 100
    assert value == value.to_integral_value()
    return int(value)


def tpaga_charge(api_url: str, charge_id: str) -> dict[str, Any]:
    """The charge exactly as the emulator serves it (GET charge/credit_card/{id}), not as we parsed it."""
    response = requests.get(f"{api_url}charge/credit_card/{charge_id}", auth=(DEFAULT_PRIVATE_KEY, ""), timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def world(pg_url: str, sandbox: SandboxThread) -> Iterator[World]:
    yield from make_world(pg_url, sandbox)


def plan(world: World, code: str, amount: str, tax: str, tax_rate: int | None = None) -> int:
    result = commands.upsert_plan(
        world.ctx, code=code, amount=amount, currency="COP", tax=tax, tax_rate=tax_rate, name=code
    )
    return int(result["plan_id"])


def charged(world: World, plan_id: int) -> tuple[int, dict[str, Any]]:
    """Subscribe a fresh customer to the plan, charge its first invoice; (invoice id, Tpaga's charge JSON)."""
    customer_id = catalog.create_customer(world.ctx, email="ana@example.com")
    card_id = world.attach(customer_id, APPROVES)
    subscription_id = catalog.subscribe(world.ctx, customer_id=customer_id, plan_id=plan_id, card_id=card_id)
    invoicing.open_due_invoices(world.ctx)
    with world.ctx.sessions() as session:
        invoice_id = session.execute(select(Invoice.id).where(Invoice.subscription_id == subscription_id)).scalar_one()
    assert charge_invoice(world.ctx, invoice_id).outcome == "approved"
    [attempt] = world.attempts(invoice_id)
    assert attempt.tpaga_charge_id is not None
    return invoice_id, tpaga_charge(world.emulator.api_url, attempt.tpaga_charge_id)


def test_iva_and_inc_plans_send_their_tax_and_the_settlement_is_stored_as_tpaga_returned_it(world: World) -> None:
    iva = plan(world, "iva19", "119000", "iva")
    inc = plan(world, "inc8", "108000", "inc")
    iva5 = plan(world, "iva5", "45000", "iva", 5)
    excluded = plan(world, "cloud", "4500", "excluded")

    sent = {
        code: charged(world, plan_id)
        for code, plan_id in (("iva19", iva), ("inc8", inc), ("iva5", iva5), ("cloud", excluded))
    }

    # What reached Tpaga over HTTP: the issue's example, 119,000 COP at IVA 19 % -> taxAmount 19,000.
    assert (sent["iva19"][1]["taxAmount"], sent["iva19"][1]["iacAmount"]) == ("19000.00", "0.00")
    assert (sent["inc8"][1]["taxAmount"], sent["inc8"][1]["iacAmount"]) == ("0.00", "8000.00")
    assert sent["iva5"][1]["taxAmount"] == "2143.00"  # 45,000 * 5 / 105 = 2,142.86 -> 2,143
    assert (sent["cloud"][1]["taxAmount"], sent["cloud"][1]["iacAmount"]) == ("0.00", "0.00")
    # The invoices record base and tax lines.
    lines = {code: world.invoice(invoice_id) for code, (invoice_id, _) in sent.items()}
    assert (lines["iva19"].base_minor, lines["iva19"].tax_minor, lines["iva19"].tax_rate) == (10_000_000, 1_900_000, 19)
    assert (lines["inc8"].base_minor, lines["inc8"].tax_minor, lines["inc8"].tax_treatment) == (
        10_000_000,
        800_000,
        "inc",
    )
    assert (lines["cloud"].base_minor, lines["cloud"].tax_minor, lines["cloud"].tax_treatment) == (
        450_000,
        0,
        "excluded",
    )
    # The seed's 4,500 COP charge with no tax: fee 868, reteRenta 68, reteICA 19, reteIVA 0, net 3,545.
    cloud = sent["cloud"][1]
    assert [cloud[k] for k in ("tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "reteIvaAmount", "netAmount")] == [
        "868.00",
        "68.00",
        "19.00",
        "0.00",
        "3545.00",
    ]
    # IVA is withheld in part (reteIVA) when the charge carries it.
    assert minor(sent["iva19"][1]["reteIvaAmount"]) > 0
    # Every approved attempt stores each figure, paymentTransaction and dateCreated as returned.
    for invoice_id, body in sent.values():
        [attempt] = world.attempts(invoice_id)
        assert {column: getattr(attempt, column) for column in FIGURES} == {
            column: minor(body[key]) for column, key in FIGURES.items()
        }
        assert attempt.payment_transaction == body["paymentTransaction"] and attempt.payment_transaction
        assert attempt.tpaga_created_at == datetime.fromisoformat(body["dateCreated"])

    # The settlement report's totals are the sum of the emulator's figures for the same charges, to the peso.
    with world.ctx.sessions() as session:
        report = reports.settlement(session)
    bodies = [body for _, body in sent.values()]
    assert report["currency"] == "COP"
    assert set(report["totals"]) == {
        "gross_minor",
        "tax_minor",
        "fee_minor",
        "rete_renta_minor",
        "rete_ica_minor",
        "rete_iva_minor",
        "net_minor",
    }
    assert report["totals"] == {
        "gross_minor": sum(minor(b["amount"]) for b in bodies),
        "tax_minor": sum(minor(b["taxAmount"]) + minor(b["iacAmount"]) for b in bodies),
        "fee_minor": sum(minor(b["tpagaFeeAmount"]) for b in bodies),
        "rete_renta_minor": sum(minor(b["reteRentaAmount"]) for b in bodies),
        "rete_ica_minor": sum(minor(b["reteIcaAmount"]) for b in bodies),
        "rete_iva_minor": sum(minor(b["reteIvaAmount"]) for b in bodies),
        "net_minor": sum(minor(b["netAmount"]) for b in bodies),
    }
    assert sum(day["charges"] for day in report["days"]) == 4
    assert report["totals"]["gross_minor"] == 27_650_000
    # gross = net + fee + withholdings, per day and in total.
    for figures in (*report["days"], report["totals"]):
        kept = sum(figures[k] for k in ("fee_minor", "rete_renta_minor", "rete_ica_minor", "rete_iva_minor"))
        assert figures["gross_minor"] == figures["net_minor"] + kept


def test_the_cli_report_gives_the_issue_shape_and_csv_and_leaves_voided_charges_out(world: World, pg_url: str) -> None:
    paid_invoice, paid = charged(world, plan(world, "iva19", "119000", "iva"))
    voided_invoice, _ = charged(world, plan(world, "inc8", "108000", "inc"))
    refund = refunds.request_refund(world.ctx, invoice_id=voided_invoice, reason="customer asked")
    assert voids.execute_refund(world.ctx, refund.refund_id).state == "voided"
    cli = make_cli(pg_url)

    report = json.loads(cli.ok("report", "--settlement", "--json").output)

    assert set(report) == {"currency", "days", "totals"}
    assert report["totals"]["gross_minor"] == minor(paid["amount"]) == 11_900_000
    assert report["totals"]["tax_minor"] == 1_900_000
    assert report["totals"]["net_minor"] == minor(paid["netAmount"])
    [day] = report["days"]
    assert day["charges"] == 1 and day["unreported"] == 0
    csv_lines = cli.ok("report", "--settlement", "--csv").output.splitlines()
    assert csv_lines[0] == (
        "date,charges,unreported,gross_minor,tax_minor,fee_minor,rete_renta_minor,rete_ica_minor,rete_iva_minor,"
        "net_minor"
    )
    assert csv_lines[-1].split(",")[:5] == ["total", "1", "0", "11900000", "1900000"]
    table = cli.ok("report", "--settlement").output
    assert "119000.00 COP" in table and "total" in table
    # A window that holds none of the charges: no days, zero totals.
    later = (world.clock.now() + timedelta(days=2)).date().isoformat()
    empty = json.loads(cli.ok("report", "--settlement", "--json", "--since", later).output)
    assert empty["days"] == [] and set(empty["totals"].values()) == {0}
    assert paid_invoice != voided_invoice


@pytest.mark.parametrize(
    ("args", "match", "code"),
    [
        (["--csv"], "--csv goes with --settlement", 2),
        (["--settlement", "--csv", "--json"], "give one of --json or --csv", 2),
        (["--settlement", "--currency", "EUR"], "unknown currency 'EUR'", 2),
        (["--settlement", "--since", "2027-01-02", "--until", "2027-01-01"], "must be after --since", 2),
        (["--settlement", "--since", "yesterday"], "not an ISO 8601 date", 2),
    ],
)
def test_report_settlement_refuses_bad_options(pg_url: str, args: list[str], match: str, code: int) -> None:
    make_cli(pg_url).fails("report", *args, match=match, code=code)


# --- bad input: nothing changed ----------------------------------------------------------------------------


def _plans_and_commands(world: World) -> tuple[list[tuple[str, str, int]], int]:
    with world.ctx.sessions() as session:
        plans = [(p.code, p.tax_treatment, p.tax_rate) for p in session.execute(select(Plan)).scalars()]
        return sorted(plans), int(session.execute(select(func.count()).select_from(Command)).scalar_one())


@pytest.mark.parametrize(
    ("tax", "rate", "match"),
    [
        ("vat", None, "unknown tax treatment 'vat'; expected one of iva, inc, excluded, exempt"),
        ("IVA", None, "unknown tax treatment 'IVA'"),
        ("iva", 16, "tax rate 16 is not allowed for iva; allowed: 19 or 5"),
        ("inc", 19, "tax rate 19 is not allowed for inc; allowed: 8"),
        ("excluded", 19, "tax rate 19 is not allowed for excluded; allowed: 0"),
        ("iva", "19", "tax rate '19' is not allowed"),
    ],
)
def test_upsert_plan_refuses_a_bad_tax_and_changes_nothing(world: World, tax: str, rate: Any, match: str) -> None:
    before = _plans_and_commands(world)
    with pytest.raises(InvalidRequest, match=match):
        commands.upsert_plan(world.ctx, code="new", amount="119000", currency="COP", tax=tax, tax_rate=rate)
    with pytest.raises(InvalidRequest, match=match):
        commands.upsert_plan(world.ctx, code="pro", amount="45000", currency="COP", tax=tax, tax_rate=rate)
    assert _plans_and_commands(world) == before


def test_the_tax_of_a_plan_in_use_cannot_change(world: World) -> None:
    plan_id = plan(world, "gold", "119000", "iva")
    charged(world, plan_id)
    with pytest.raises(InvalidRequest, match="is in use and its terms cannot change"):
        commands.upsert_plan(world.ctx, code="gold", amount="119000", currency="COP", tax="iva", tax_rate=5)
    assert ("gold", "iva", 19) in _plans_and_commands(world)[0]
    # The same terms again change nothing; a plan nobody uses yet may change its tax.
    assert commands.upsert_plan(world.ctx, code="gold", amount="119000", currency="COP", tax="iva")["changed"] is False
    plan(world, "silver", "108000", "iva")
    assert commands.upsert_plan(world.ctx, code="silver", amount="108000", currency="COP", tax="inc")["changed"]
    assert ("silver", "inc", 8) in _plans_and_commands(world)[0]


def test_cli_plans_create_with_a_tax_and_its_bad_input(pg_url: str) -> None:
    cli: Cli = make_cli(pg_url)
    out = cli.ok("plans", "create", "--code", "gold", "--amount", "119000", "--tax", "iva").output
    assert "tax iva 19%" in out
    cli.ok("plans", "create", "--code", "resto", "--amount", "108000", "--tax", "inc", "--tax-rate", "8")
    listed = {p["code"]: (p["tax"], p["tax_rate"]) for p in cli.json("plans", "list")}
    assert listed == {"gold": ("iva", 19), "resto": ("inc", 8)}
    cli.fails("plans", "create", "--code", "x", "--amount", "1000", "--tax", "vat", match="unknown tax treatment 'vat'")
    cli.fails(
        "plans", "create", "--code", "x", "--amount", "1000", "--tax", "iva", "--tax-rate", "16", match="not allowed"
    )
    cli.fails("plans", "create", "--code", "x", "--amount", "1000", "--tax-rate", "x", match="Invalid value", code=2)
    assert {p["code"] for p in cli.json("plans", "list")} == {"gold", "resto"}


# --- the emulator's rates -------------------------------------------------------------------------------


def test_the_emulators_settlement_rates_are_options(sandbox_factory: Any) -> None:
    server = sandbox_factory(
        fee_fixed=Decimal(0), fee_rate=Decimal("0.03"), rete_renta_rate=Decimal(0), rete_iva_rate=Decimal("0.1")
    )
    with TpagaClient(server.api_url, DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY) as client:
        customer = client.create_customer(first_name="Ana")
        token = client.tokenize_card(number=APPROVES, exp_month=5, exp_year=2035, holder_name="Ana", cvc="123")
        card = client.associate_card(customer.id, token)
        charge = client.charge(card_id=card.id, amount=Decimal(119000), order_id="o-1", tax_amount=Decimal(19000))
    body = tpaga_charge(server.api_url, charge.id)
    # fee 3 % of 119,000; reteRenta 0; reteICA 0.414 % of the base 100,000; reteIVA 10 % of the IVA.
    assert [body[k] for k in ("tpagaFeeAmount", "reteRentaAmount", "reteIcaAmount", "reteIvaAmount")] == [
        "3570.00",
        "0.00",
        "414.00",
        "1900.00",
    ]
    assert body["netAmount"] == "113116.00"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"fee_rate": Decimal("0.5")}, "fee_rate must be between 0 and 0.2"),
        ({"rete_iva_rate": Decimal(-1)}, "rete_iva_rate must be between 0 and 0.2"),
        ({"fee_fixed": Decimal(-1)}, "fee_fixed must be >= 0"),
        ({"rete_ica_rate": 0.004}, "rete_ica_rate must be a Decimal or an int"),
    ],
)
def test_bad_emulator_rates_are_refused(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SandboxConfig(**fields).validate()


def test_the_settlement_report_reads_the_same_on_sqlite(sqlite_url: str, sandbox: SandboxThread) -> None:
    # The embedded default: the same figures, and --since/--until select on Tpaga's time there too.
    for lite in make_world(sqlite_url, sandbox):
        _, body = charged(lite, plan(lite, "inc8", "108000", "inc"))
        with lite.ctx.sessions() as session:
            report = reports.settlement(session)
            after = reports.settlement(
                session, since=datetime.fromisoformat(body["dateCreated"]) + timedelta(seconds=1)
            )
            before = reports.settlement(session, until=datetime.fromisoformat(body["dateCreated"]))
        assert report["totals"]["tax_minor"] == minor(body["iacAmount"]) == 800_000
        assert report["totals"]["net_minor"] == minor(body["netAmount"])
        assert after["days"] == before["days"] == []
        # A day is Bogota's (UTC-5): 04:30 UTC on 5 January is still 4 January there.
        with lite.ctx.sessions() as session, session.begin():
            session.execute(update(ChargeAttempt).values(tpaga_created_at=datetime(2027, 1, 5, 4, 30, tzinfo=UTC)))
        with lite.ctx.sessions() as session:
            [day] = reports.settlement(session)["days"]
        assert day["date"] == "2027-01-04"


def test_billing_sandbox_takes_the_settlement_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from billing.cli import main

    configs: list[SandboxConfig] = []
    monkeypatch.setattr("billing.cli.sandbox.run", configs.append)
    runner = CliRunner()
    result = runner.invoke(
        main, ["sandbox", "--fee-rate", "0.03", "--rete-iva-rate", "0"], env={"TPAGA_SANDBOX_FEE_FIXED": "500"}
    )
    assert result.exit_code == 0, result.output
    [config] = configs
    assert (config.fee_fixed, config.fee_rate, config.rete_iva_rate) == (Decimal(500), Decimal("0.03"), Decimal(0))
    assert config.rete_renta_rate == SandboxConfig().rete_renta_rate  # the default: the blog's sample
    for args, named in (
        (["--fee-rate", "0.5"], "fee_rate must be between 0 and 0.2"),
        (["--fee-fixed", "lots"], "'lots' is not a decimal"),
    ):
        bad = runner.invoke(main, ["sandbox", *args])
        assert bad.exit_code == 2 and named in bad.output
    assert len(configs) == 1


def test_tasks_client_sends_the_tax_only_when_given() -> None:
    from tasks import client
    from tests.test_tasks_masking import RecordingApp

    sender = RecordingApp()
    client.upsert_plan(sender, code="g", amount="119000", currency="COP", interval="month", tax="iva", tax_rate=5)  # type: ignore[arg-type]
    client.upsert_plan(sender, code="h", amount="4500", currency="COP", interval="month")  # type: ignore[arg-type]
    (_, with_tax), (_, without) = sender.calls
    assert (with_tax["kwargs"]["tax"], with_tax["kwargs"]["tax_rate"]) == ("iva", 5)
    assert "tax" not in without["kwargs"] and "tax_rate" not in without["kwargs"]  # the worker's default: excluded
