"""Tpaga's transaction report (a CSV downloaded from the merchant dashboard), read into checked rows.

Tpaga never published the export's columns, so the format is ours, close to what a dashboard exports, and every
column name can be remapped (`--columns orderId=Referencia,...`). Documented in docs/operations.md §8; the
emulator serves the same report at /__sandbox/report.csv.

Reading is all or nothing: a file with one bad line is refused whole, naming the line, before anything changes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing.domain.money import MoneyError, parse_decimal
from billing.services.errors import ServiceError

# Our field names, in the order of the default header (the emulator writes exactly these).
FIELDS = ("orderId", "chargeId", "amount", "currency", "status", "date")
REQUIRED = ("orderId", "chargeId", "amount", "status", "date")
DEFAULT_CURRENCY = "COP"
# Tpaga's transactionInfo.status values (tpaga-api.md §3).
AUTHORIZED = "authorized"
STATUSES = ("authorized", "processor_declined", "created", "voided")
# Tpaga's own time zone: a date without an offset in its export is Colombian time.
TPAGA_TZ = ZoneInfo("America/Bogota")
MAX_ROWS = 1_000_000


class BadReport(ServiceError):
    """Raised when a transaction report (or its column mapping) cannot be read; nothing was changed."""


@dataclass(frozen=True)
class ReportRow:
    """One charge in the report, as Tpaga's dashboard lists it."""

    line: int
    order_id: str  # "" when the charge had no orderId
    charge_id: str
    amount: Decimal
    currency: str
    status: str
    date: datetime  # aware

    @property
    def authorized(self) -> bool:
        return self.status == AUTHORIZED


def parse_columns(spec: str | None) -> dict[str, str]:
    """`orderId=Referencia,chargeId=ID transacción` -> {field: header}; every other field keeps its own name."""
    mapping = {name: name for name in FIELDS}
    if spec is None or not spec.strip():
        return mapping
    seen: set[str] = set()
    for part in spec.split(","):
        field, equals, header = part.partition("=")
        field, header = field.strip(), header.strip()
        if not equals or not field or not header:
            raise BadReport(f"--columns: {part.strip()!r} is not FIELD=COLUMN (e.g. orderId=Referencia)")
        if field not in FIELDS:
            raise BadReport(f"--columns: unknown field {field!r}; the fields are {', '.join(FIELDS)}")
        if field in seen:
            raise BadReport(f"--columns: {field} is mapped twice")
        seen.add(field)
        mapping[field] = header
    headers = [mapping[f] for f in FIELDS]
    twice = sorted({h for h in headers if headers.count(h) > 1})
    if twice:
        raise BadReport(f"--columns: column {twice[0]!r} is given to two fields")
    return mapping


def decode(data: bytes, name: str) -> str:
    """The report's text: UTF-8, with or without the byte-order mark spreadsheet programs write."""
    if b"\x00" in data[:4096]:
        raise BadReport(f"{name} is not a CSV file (it holds binary data)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadReport(f"{name} is not UTF-8 text (byte {exc.start}); export the report as UTF-8 CSV") from None


def _delimiter(header_line: str) -> str:
    # A spreadsheet in a Spanish locale writes ';' between columns (',' is its decimal separator).
    return ";" if header_line.count(";") > header_line.count(",") else ","


def read_report(text: str, name: str, columns: Mapping[str, str] | None = None) -> list[ReportRow]:
    """Every row of the report, checked; raises BadReport naming the first problem (and its line)."""
    mapping = dict(columns) if columns is not None else parse_columns(None)
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise BadReport(f"{name} is empty: expected a header line ({', '.join(mapping[f] for f in FIELDS)})")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(first), strict=True)
    try:
        header = next(reader)
        while not any(cell.strip() for cell in header):
            header = next(reader)
    except csv.Error as exc:
        raise BadReport(f"{name}, line {reader.line_num}: not CSV ({exc})") from None
    names = [cell.strip() for cell in header]
    duplicated = sorted({n for n in names if n and names.count(n) > 1})
    if duplicated:
        raise BadReport(f"{name}: the header names column {duplicated[0]!r} twice")
    index: dict[str, int] = {}
    missing = []
    for field in FIELDS:
        header_name = mapping[field]
        if header_name in names:
            index[field] = names.index(header_name)
        elif field in REQUIRED:
            missing.append(f"{header_name!r} (for {field})" if header_name != field else repr(field))
    if missing:
        raise BadReport(
            f"{name} has no column {', '.join(missing)}; its columns are {', '.join(repr(n) for n in names)}. "
            "Name the report's columns with --columns FIELD=COLUMN,... (see docs/operations.md §8)"
        )
    rows: list[ReportRow] = []
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(names):
                raise BadReport(f"{name}, line {reader.line_num}: {len(cells)} fields, the header has {len(names)}")
            if len(rows) >= MAX_ROWS:
                raise BadReport(f"{name} has more than {MAX_ROWS} rows: import it in smaller date ranges")
            rows.append(_row(name, reader.line_num, {f: cells[i].strip() for f, i in index.items()}))
    except csv.Error as exc:
        raise BadReport(f"{name}, line {reader.line_num}: not CSV ({exc})") from None
    _check_unique(name, rows)
    return rows


def _row(name: str, line: int, cells: Mapping[str, str]) -> ReportRow:
    where = f"{name}, line {line}"
    charge_id = cells["chargeId"]
    if not charge_id:
        raise BadReport(f"{where}: the charge id is empty")
    if len(charge_id) > 64 or len(cells["orderId"]) > 128:
        raise BadReport(f"{where}: the charge id or the orderId is too long to be Tpaga's")
    try:
        amount = parse_decimal(cells["amount"])
    except MoneyError:
        raise BadReport(f"{where}: amount {cells['amount']!r} is not a decimal number like 45000.00") from None
    if amount <= 0:
        raise BadReport(f"{where}: amount {cells['amount']!r} is not positive")
    currency = (cells.get("currency") or DEFAULT_CURRENCY).upper()
    status = cells["status"].lower()
    if status not in STATUSES:
        raise BadReport(f"{where}: status {cells['status']!r} is not one of {', '.join(STATUSES)}")
    return ReportRow(line, cells["orderId"], charge_id, amount, currency, status, parse_date(cells["date"], where))


def parse_date(text: str, where: str, default_tz: tzinfo = TPAGA_TZ) -> datetime:
    """An ISO 8601 date and time; without an offset it is Tpaga's (Colombian) time."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadReport(
            f"{where}: date {text!r} is not an ISO 8601 date and time (e.g. 2026-03-10T08:00:00-05:00)"
        ) from None
    return when.replace(tzinfo=default_tz) if when.tzinfo is None else when


def _check_unique(name: str, rows: list[ReportRow]) -> None:
    """A charge listed twice with different facts means two reports were merged badly: refuse the file."""
    first: dict[str, ReportRow] = {}
    for row in rows:
        seen = first.setdefault(row.charge_id, row)
        if seen is not row and (seen.order_id, seen.amount, seen.status, seen.date) != (
            row.order_id,
            row.amount,
            row.status,
            row.date,
        ):
            raise BadReport(f"{name}: charge {row.charge_id} is on lines {seen.line} and {row.line} with other values")
