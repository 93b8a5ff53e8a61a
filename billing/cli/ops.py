"""Operator commands: `billing tick|status|report|review|refund|resume|clock`."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

import click

from billing import display
from billing.cli.common import (
    ID,
    actor_options,
    by_option,
    database_option,
    echo_json,
    echo_table,
    format_money,
    format_time,
    handle_errors,
    json_option,
    load_settings,
    make_actor,
    open_context,
    parse_when,
    session_scope,
)
from billing.domain.money import CURRENCY_EXPONENTS

# --- tick ------------------------------------------------------------------------------------------------


def _echo_counts(title: str, counts: dict[str, Any]) -> None:
    click.echo(f"{title:<12} {display.counts(counts, empty='-')}")


@click.command()
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256), help="Charges in flight.")
@json_option
@database_option
@handle_errors
def tick(threads: int, as_json: bool, database_url: str | None) -> None:
    """Run one cycle of all periodic work in this process, no broker needed.

    Opens due invoices, charges them, retries dunning, executes and expires refunds, reconciles stuck and
    unknown attempts. Safe to run again or alongside workers: the database prevents double charges.
    """
    from billing.gateway import TpagaClient
    from billing.services.context import DropPublisher
    from billing.services.tick import run_tick

    settings = load_settings(database_url)
    # Built now, not lazily: a charge that fails to build its client must never be recorded as "unknown".
    client = TpagaClient.from_settings(settings)
    try:
        with open_context(settings, publisher=DropPublisher(), gateway=client) as ctx:
            report = run_tick(ctx, threads=threads)
    finally:
        client.close()
    if as_json:
        echo_json(report)
        return
    click.echo(f"{'opened':<12} {report.get('opened', 0)} invoice(s)")
    _echo_counts("charges", report.get("charges", {}))
    _echo_counts("reconciled", report.get("reconciled", {}))
    _echo_counts("lookups", report.get("lookups", {}))
    _echo_counts("refunds", report.get("refunds", {}))
    click.echo(f"{'expired':<12} {report.get('refunds_expired', 0)} refund(s)")
    if report.get("resumed"):
        click.echo("billing resumed: the gateway accepts the API key again")


# --- status and report -----------------------------------------------------------------------------------


@click.command()
@json_option
@database_option
@handle_errors
def status(as_json: bool, database_url: str | None) -> None:
    """Counts of invoices, attempts, refunds and subscriptions by state; the review queue; any pause."""
    from billing.services import reports

    with session_scope(load_settings(database_url)) as session:
        data = reports.status(session)
    if as_json:
        echo_json(data)
        return
    for section in ("subscriptions", "invoices", "attempts", "refunds"):
        counts = data.get(section) or {}
        total = sum(counts.values())
        click.echo(f"{section:<14} {total:>7}   {display.counts(counts, empty='')}")
    click.echo(
        f"{'review queue':<14} {data.get('review', 0):>7}"
        + ("   (see `billing review list`)" if data.get("review") else "")
    )
    paused = data.get("paused")
    if paused:
        click.echo(
            f"BILLING PAUSED since {paused.get('since')}: {paused.get('reason')}"
            + (f" (errorCode {paused['error_code']})" if paused.get("error_code") else "")
            + "; lift with `billing resume`"
        )
    else:
        click.echo(f"{'billing':<14} running")


@click.command()
@click.option("--since", default=None, metavar="ISO", help="Attempts created at or after (naive = UTC).")
@click.option("--until", default=None, metavar="ISO", help="Attempts created before (naive = UTC).")
@click.option(
    "--settlement",
    is_flag=True,
    help="Tpaga's settlement figures per America/Bogota day instead (--since/--until: Tpaga's charge time).",
)
@click.option("--currency", default="COP", show_default=True, help="With --settlement: the currency reported.")
@click.option("--csv", "as_csv", is_flag=True, help="With --settlement: CSV, amounts in minor units.")
@json_option
@database_option
@handle_errors
def report(
    since: str | None,
    until: str | None,
    settlement: bool,
    currency: str,
    as_csv: bool,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Charge outcomes by Tpaga errorCode and decline class, or (--settlement) what Tpaga pays out per day."""
    from billing.services import reports

    since_at, until_at = parse_when(since, "--since"), parse_when(until, "--until")
    if since_at and until_at and since_at >= until_at:
        raise click.BadParameter("must be after --since", param_hint="--until")
    if as_csv and not settlement:
        raise click.UsageError("--csv goes with --settlement")
    if as_csv and as_json:
        raise click.UsageError("give one of --json or --csv")
    if settlement and currency.upper() not in CURRENCY_EXPONENTS:
        raise click.BadParameter(f"unknown currency {currency!r}", param_hint="--currency")
    with session_scope(load_settings(database_url)) as session:
        if settlement:
            _settlement_report(reports.settlement(session, currency.upper(), since_at, until_at), as_json, as_csv)
            return
        rows = reports.outcomes_by_code(session, since_at, until_at)
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["errorCode", "class", "state", "count", "amount"],
        [
            (
                r["error_code"] if r["error_code"] is not None else "-",
                r["class"],
                r["state"],
                r["count"],
                format_money(r["amount_minor"], r["currency"]),
            )
            for r in rows
        ],
        empty="no charge attempts in that range",
    )


_SETTLEMENT_HEADINGS = ("gross", "tax", "fee", "reteRenta", "reteICA", "reteIVA", "net")


def _settlement_report(result: dict[str, Any], as_json: bool, as_csv: bool) -> None:
    from billing.services.reports import SETTLEMENT_TOTALS

    if as_json:
        echo_json(result)
        return
    days, totals, currency = result["days"], result["totals"], result["currency"]
    if as_csv:
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["date", "charges", "unreported", *SETTLEMENT_TOTALS])
        for day in days:
            writer.writerow([day["date"], day["charges"], day["unreported"], *(day[k] for k in SETTLEMENT_TOTALS)])
        charges = sum(d["charges"] for d in days)
        unreported = sum(d["unreported"] for d in days)
        writer.writerow(["total", charges, unreported, *(totals[k] for k in SETTLEMENT_TOTALS)])
        click.echo(out.getvalue(), nl=False)
        return
    rows = [(d["date"], d["charges"], *(format_money(d[k], currency) for k in SETTLEMENT_TOTALS)) for d in days]
    if days:
        charges = sum(d["charges"] for d in days)
        rows.append(("total", charges, *(format_money(totals[k], currency) for k in SETTLEMENT_TOTALS)))
    echo_table(["day (Bogota)", "charges", *_SETTLEMENT_HEADINGS], rows, empty="no settled charges in that range")
    unreported = sum(d["unreported"] for d in days)
    if unreported:
        click.echo(f"{unreported} charge(s) approved without Tpaga's figures (before migration 0007): net not known")


# --- review ----------------------------------------------------------------------------------------------


@click.group()
def review() -> None:
    """The review queue: invoices whose charge outcome is unknown, blocked until resolved."""


@review.command("list")
@click.option(
    "--limit",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Show N invoices (a page of N with --page).",
)
@click.option(
    "--page",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="P",
    help="Show the P-th page of --limit invoices, oldest first.",
)
@click.option("--all", "show_all", is_flag=True, help="Show every invoice in review (instead of --limit/--page).")
@json_option
@database_option
@handle_errors
@click.pass_context
def review_list(
    ctx: click.Context, limit: int, page: int, show_all: bool, as_json: bool, database_url: str | None
) -> None:
    """Invoices waiting for an operator, oldest first, a page at a time, and how many there are in all.

    With --json, stdout is the list of invoices and stderr one line {"total": N, "shown": M, "page": P,
    "pages": Q}.
    """
    from billing.services import reconcile

    explicit = [
        f"--{name}"
        for name in ("limit", "page")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if show_all and explicit:
        raise click.UsageError(f"--all and {' and '.join(explicit)} exclude each other: give one of them")
    offset = 0 if show_all else (page - 1) * limit
    with session_scope(load_settings(database_url)) as session:
        rows = reconcile.review_queue(session, limit=None if show_all else limit, offset=offset)
        # Counted after listing, so a row resolved in between never makes the total smaller than the page.
        count = reconcile.review_count(session)
        total = max(count, offset + len(rows)) if rows else count
    size = max(total, 1) if show_all else limit
    pages = max(1, -(-total // size))
    if as_json:
        echo_json(rows)
        # stdout stays the list it always was (scripts parse it); the count goes beside it.
        click.echo(
            json.dumps({"total": total, "shown": len(rows), "page": 1 if show_all else page, "pages": pages}),
            err=True,
        )
        return
    if not rows and total:
        click.echo(f"page {page} is past the end: {total} in review, {pages} page(s) of {limit}")
        return
    echo_table(
        ["invoice", "subscription", "amount", "orderId", "charge id known", "reason", "since"],
        [
            (
                r["invoice_id"],
                r["subscription_id"],
                format_money(r["amount_minor"], r["currency"]),
                r["order_id"],
                "yes" if r["tpaga_charge_id_known"] else "no",
                r["reason"],
                r["since"],
            )
            for r in rows
        ],
        empty="the review queue is empty",
    )
    if len(rows) < total:
        first, last = offset + 1, offset + len(rows)
        more = f"--page {page + 1} for the next" if last < total else "the last page"
        click.echo(f"showing {first}-{last} of {total} (page {page} of {pages}); {more}, --all for every one")
    elif rows:
        click.echo(f"{total} in review")


@review.command("export")
@click.option("--csv", "as_csv", is_flag=True, help="CSV (the default and only format; for spreadsheets).")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    default="-",
    show_default=True,
    help="Write to this file instead of stdout.",
)
@database_option
@handle_errors
def review_export(as_csv: bool, output: str, database_url: str | None) -> None:
    """Every invoice in review as CSV: the orderIds, amounts and times to search Tpaga's transaction report.

    A request may have reached Tpaga between `sent_at` and `flagged_at`: download the report for a range that
    covers them all, then `billing review import` it.
    """
    import csv

    from billing.services import reconcile

    with session_scope(load_settings(database_url)) as session:
        rows = reconcile.review_export(session)
    columns = [
        "invoice_id",
        "subscription_id",
        "attempt_id",
        "order_id",
        "amount",
        "currency",
        "sent_at",
        "flagged_at",
        "charge_id_known",
        "reason",
        "since",
    ]
    with click.open_file(output, "w", encoding="utf-8") as out:
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("yes" if v is True else "no" if v is False else v) for k, v in row.items()})
    if output != "-":
        click.echo(f"{len(rows)} invoice(s) in review written to {output}", err=True)


@review.command("resolve")
@click.argument("invoice_id", type=ID)
@click.option(
    "--charged/--not-charged",
    "charged",
    default=None,
    help="What Tpaga's records say: the card WAS charged (needs --charge-id) or was NOT.",
)
@click.option("--charge-id", default=None, help="The Tpaga charge id of the approved charge (with --charged).")
@actor_options
@database_option
@handle_errors
def review_resolve(
    invoice_id: int,
    charged: bool | None,
    charge_id: str | None,
    by: str | None,
    reason: str | None,
    database_url: str | None,
) -> None:
    """Settle an invoice in review: --charged --charge-id ID (verified at Tpaga), or --not-charged."""
    from billing.services import reconcile

    actor = make_actor(by, reason)
    if charged is None:
        raise click.UsageError("say what happened: --charged --charge-id ID, or --not-charged")
    if charged and not (charge_id and charge_id.strip()):
        raise click.UsageError("--charged needs --charge-id (the Tpaga charge id, verified with a lookup)")
    if not charged and charge_id:
        raise click.UsageError("--charge-id goes with --charged, not --not-charged")
    with open_context(load_settings(database_url)) as ctx:
        outcome = reconcile.resolve_review(
            ctx,
            invoice_id=invoice_id,
            charged=charged,
            tpaga_charge_id=charge_id.strip() if charge_id else None,
            actor=actor,
        )
    messages = {
        "approved": f"invoice {invoice_id} resolved as charged: paid",
        "declined": f"invoice {invoice_id} resolved: Tpaga says the charge was declined; dunning continues",
        "not_charged": f"invoice {invoice_id} resolved as not charged: it will be charged on the next run",
    }
    if outcome == "still_unknown":
        raise click.ClickException(f"invoice {invoice_id} is still unknown: Tpaga's answer did not settle it")
    click.echo(messages.get(outcome, f"invoice {invoice_id}: {outcome}"))


def _report_time(value: str | None, name: str) -> datetime | None:
    """A bound of the report's range; without an offset it is Tpaga's (Colombian) time, as the dashboard's is."""
    from billing.services.tpaga_report import TPAGA_TZ

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (e.g. 2026-03-10 or 2026-03-10T08:00:00-05:00)",
            param_hint=name,
        ) from None
    return when.replace(tzinfo=TPAGA_TZ) if when.tzinfo is None else when


def _parse_margin(text: str) -> timedelta:
    try:
        return parse_duration(text) if text.strip() not in ("0", "0s") else timedelta(0)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--clock-margin") from None


@review.command("import")
@click.argument("report", type=click.Path(exists=True, dir_okay=False, readable=True, allow_dash=False))
@click.option(
    "--columns",
    default=None,
    metavar="FIELD=COLUMN,...",
    help="The report's column names for orderId, chargeId, amount, currency, status, date (e.g. "
    "orderId=Referencia,chargeId=ID); unnamed fields keep their own name.",
)
@click.option(
    "--from",
    "covered_from",
    default=None,
    metavar="ISO",
    help="Start of the range the report was exported for (without an offset: Colombian time, as Tpaga's).",
)
@click.option("--to", "covered_to", default=None, metavar="ISO", help="End of that range (exclusive).")
@click.option(
    "--clock-margin",
    default="60s",
    show_default=True,
    metavar="DURATION",
    help="How far Tpaga's clock may be from ours: an attempt counts as covered only this far inside the range.",
)
@click.option(
    "--void-foreign",
    is_flag=True,
    help="Also void charges whose orderId this system never makes (a merchant account used by other sales too "
    "should not).",
)
@click.option("--dry-run", is_flag=True, help="Say what the import would do; change nothing, call nothing.")
@actor_options
@json_option
@database_option
@handle_errors
def review_import(
    report: str,
    columns: str | None,
    covered_from: str | None,
    covered_to: str | None,
    clock_margin: str,
    void_foreign: bool,
    dry_run: bool,
    by: str | None,
    reason: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Reconcile the review queue with a transaction report downloaded from Tpaga's dashboard (CSV).

    A row for an unknown attempt settles it (verified with a GET of that charge id); an unknown attempt that
    could only have reached Tpaga inside the report's range and has no row was not charged; a charged row that
    matches no attempt is voided inside the void window. Without --from/--to the range is the span of the
    report's own dates. Importing the same report again changes nothing. See docs/operations.md §8.
    """
    from pathlib import Path

    from billing.services import review_import as importer
    from billing.services import tpaga_report

    actor = make_actor(by, reason)
    start, end = _report_time(covered_from, "--from"), _report_time(covered_to, "--to")
    if start and end and start >= end:
        raise click.BadParameter("must be after --from", param_hint="--to")
    margin = _parse_margin(clock_margin)
    mapping = tpaga_report.parse_columns(columns)
    path = Path(report)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {report}: {exc.strerror}") from None
    rows = tpaga_report.read_report(tpaga_report.decode(data, path.name), path.name, mapping)
    with open_context(load_settings(database_url)) as ctx:
        if dry_run:
            todo = importer.prepare(
                ctx, rows, covered_from=start, covered_to=end, margin=margin, void_foreign=void_foreign
            )
            summary = {"dry_run": True, **todo.summary()}
            if as_json:
                echo_json(summary)
            else:
                _echo_plan(summary)
            return
        result = importer.import_report(
            ctx,
            rows,
            actor=actor,
            source=path.name,
            digest=importer.sha256(data),
            covered_from=start,
            covered_to=end,
            margin=margin,
            void_foreign=void_foreign,
        )
        with ctx.sessions() as session:
            from billing.services import reconcile

            in_review = reconcile.review_count(session)
    done = {**result.as_dict(), "in_review": in_review}
    if as_json:
        echo_json(done)
        return
    _echo_import(done)


def _echo_plan(summary: dict[str, Any]) -> None:
    click.echo(f"dry run: nothing changed. {summary['rows']} row(s), covering {_range(summary)}")
    click.echo(
        f"would verify {summary['to_verify']} charge(s) at Tpaga and settle them, settle {summary['not_charged']} "
        f"as not charged, and void {summary['orphans_to_void']} charge(s) unknown here"
    )
    _echo_items("discrepancies", summary["discrepancies"])
    _echo_items("left in review", summary["left_in_review"])


def _range(summary: dict[str, Any]) -> str:
    if not summary.get("covered_from"):
        return "no time range (give --from and --to)"
    return f"{summary['covered_from']} to {summary['covered_to']}"


def _echo_import(done: dict[str, Any]) -> None:
    settled = done["settled"]
    click.echo(f"{done['rows']} row(s) covering {_range(done)}; {done['known']} already recorded here")
    shown = ", ".join(f"{k} {v}" for k, v in settled.items() if v)
    click.echo(f"settled      {sum(settled.values())}" + (f" ({shown})" if shown else ""))
    voided = done["orphans_voided"]
    already = done["orphans_already_voided"]
    click.echo(
        f"voided       {len(voided)} charge(s) unknown here" + (f" ({already} already voided)" if already else "")
    )
    for item in voided:
        click.echo(f"  {item['charge_id']}  orderId {item['order_id'] or '-'}  {item['amount']} {item['currency']}")
    _echo_items("discrepancies", done["discrepancies"])
    _echo_items("left in review", done["left_in_review"])
    click.echo(f"{done['in_review']} in review now" + ("" if done["in_review"] else ": the queue is empty"))


def _echo_items(title: str, items: list[dict[str, Any]]) -> None:
    click.echo(f"{title:<12} {len(items)}")
    for item in items:
        where = f"line {item['line']}: " if "line" in item else ""
        what = item.get("order_id") or item.get("charge_id") or f"invoice {item.get('invoice_id')}"
        invoice = f" (invoice {item['invoice_id']})" if item.get("invoice_id") and "line" in item else ""
        click.echo(f"  {where}{what}{invoice}: {item['kind']}: {item['detail']}")


# --- refund and resume -----------------------------------------------------------------------------------


@click.command()
@click.argument("invoice_id", type=ID)
@click.option("--reason", required=True, help="Why (kept with the refund; at most 255 characters).")
@by_option
@json_option
@database_option
@handle_errors
def refund(invoice_id: int, reason: str, by: str | None, as_json: bool, database_url: str | None) -> None:
    """Request a refund (void) of an invoice's charge; it runs on the next `billing tick` or worker run.

    A second request for the same charge returns the first refund. Outside the void window the refund is
    recorded as expired and Tpaga is not called.
    """
    from billing.services.refunds import request_refund

    actor = make_actor(by, None)  # the refund's own --reason is checked, and recorded, by the service
    with open_context(load_settings(database_url)) as ctx:
        outcome = request_refund(ctx, invoice_id=invoice_id, reason=reason, actor=actor)
    if as_json:
        echo_json(outcome.as_dict())
        return
    what = "requested" if outcome.created else "already exists"
    tail = {
        "requested": "; it runs on the next `billing tick` or worker run",
        "expired": ": the void window has passed, Tpaga was not called",
    }.get(outcome.state, "")
    click.echo(f"refund {outcome.refund_id} {what} (state {outcome.state}){tail}")


@click.command()
@actor_options
@database_option
@handle_errors
def resume(by: str | None, reason: str | None, database_url: str | None) -> None:
    """Lift a billing pause (set after Tpaga rejected the API key or a merchant-configuration decline)."""
    from billing.services.pause import resume_billing

    actor = make_actor(by, reason)
    with open_context(load_settings(database_url)) as ctx:
        lifted = resume_billing(ctx, actor=actor)
    click.echo("billing resumed" if lifted else "billing was not paused")


# --- clock -----------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_ADVANCE = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """'31d', '12h', '90m', '3600s' or a combination such as '1d12h'; positive, at most ten years."""
    raw = text.strip().lower()
    if not raw or not re.fullmatch(r"(?:\d+[dhms])+", raw):
        raise click.BadParameter(
            f"{text!r} is not a duration: use a positive number with a unit d, h, m or s (31d, 12h, 90m, 3600s)",
            param_hint="DURATION",
        )
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(raw))
    if seconds <= 0:
        raise click.BadParameter("the duration must be positive: the clock never goes backwards", param_hint="DURATION")
    delta = timedelta(seconds=seconds)
    if delta > MAX_ADVANCE:
        raise click.BadParameter("at most 3660 days at a time", param_hint="DURATION")
    return delta


def _sandbox_clock_url(url: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--sandbox-url")
    base = url.rstrip("/")
    if base.endswith("/api"):
        base = base[: -len("/api")]
    return base + "/__sandbox/clock"


def _advance_sandbox(url: str, seconds: int) -> str:
    import requests

    endpoint = _sandbox_clock_url(url)
    try:
        response = requests.post(endpoint, json={"advanceSeconds": seconds}, timeout=(3.05, 10))
    except requests.RequestException as exc:
        raise click.ClickException(
            f"could not reach the sandbox at {endpoint} ({type(exc).__name__}); neither clock was moved"
        ) from None
    if response.status_code != 200:
        raise click.ClickException(
            f"the sandbox refused to move its clock (HTTP {response.status_code}); neither clock was moved"
        )
    try:
        return str(response.json()["now"])
    except (ValueError, KeyError, TypeError):
        return "?"


@click.group()
def clock() -> None:
    """The shared test clock (BILLING_CLOCK=database): months of billing in seconds."""


@clock.command("show")
@json_option
@database_option
@handle_errors
def clock_show(as_json: bool, database_url: str | None) -> None:
    """Print the test clock's time and its offset from the system clock."""
    from billing.clock import SystemClock
    from billing.db.control import DatabaseClock
    from billing.db.engine import make_engine, make_session_factory

    settings = load_settings(database_url)
    engine = make_engine(settings.database_url)
    try:
        db_clock = DatabaseClock(make_session_factory(engine), ttl_seconds=0)
        offset = db_clock.offset_seconds()
        now = db_clock.now()
    finally:
        engine.dispose()
    data = {
        "clock": settings.clock,
        "now": now.isoformat(),
        "offset_seconds": offset,
        "system_now": SystemClock().now().isoformat(),
    }
    if as_json:
        echo_json(data)
        return
    click.echo(f"test clock  {format_time(now)}  (offset {display.duration(offset)}, {offset:.0f}s)")
    if settings.clock != "database":
        click.echo("note: BILLING_CLOCK is not 'database', so this process runs on the system clock")


@clock.command("advance")
@click.argument("duration")
@click.option(
    "--sandbox-url",
    default=None,
    metavar="URL",
    help="Also advance the Tpaga emulator's clock at URL by the same amount (keeps refund windows in step).",
)
@database_option
@handle_errors
def clock_advance(duration: str, sandbox_url: str | None, database_url: str | None) -> None:
    """Move the shared test clock forward by DURATION (31d, 12h, 90m, 3600s, 1d12h)."""
    from billing.db.control import DatabaseClock
    from billing.db.engine import make_engine, make_session_factory

    delta = parse_duration(duration)
    settings = load_settings(database_url)
    if settings.clock != "database":
        raise click.ClickException(
            "BILLING_CLOCK is not 'database': the services run on the system clock, which cannot be advanced. "
            "Set BILLING_CLOCK=database for every process (test and demo setups only)."
        )
    seconds = int(delta.total_seconds())
    # The emulator first: it is the one that can be unreachable, and then neither clock moves.
    sandbox_now = _advance_sandbox(sandbox_url, seconds) if sandbox_url else None
    engine = make_engine(settings.database_url)
    try:
        try:
            now = DatabaseClock(make_session_factory(engine), ttl_seconds=0).advance(delta)
        except Exception:
            if sandbox_now is not None:
                click.echo(f"the sandbox clock WAS advanced by {seconds}s but the database clock was not", err=True)
            raise
    finally:
        engine.dispose()
    click.echo(f"test clock advanced by {display.duration(delta)} to {format_time(now)}")
    if sandbox_now is not None:
        click.echo(f"sandbox clock advanced by {display.duration(delta)} to {sandbox_now}")
