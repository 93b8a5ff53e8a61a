"""Set-based statements for batches of rows, on both dialects, with plans that do not depend on statistics.

Why not the obvious `UPDATE ... WHERE id IN (...) AND state = 'open'`: at the start of a billing burst the
planner's statistics say there are no open invoices and no attempts in flight (they were all settled when the
table was last analyzed), so it answers that statement with a scan of a partial or state index that, during
the burst, holds every row of the burst (and, until vacuum, the dead entries of rows already settled). Each
batch then costs O(rows in the burst) and the burst O(n^2). These helpers only ever filter by primary key (or
another unique key the caller names); state checks happen on rows this transaction has locked, which is a
compare-and-set as strict as a WHERE clause:

- PostgreSQL: `SELECT ... WHERE id = ANY(:ids) FOR UPDATE` locks the rows; their states are checked in
  Python; the writes are `UPDATE ... FROM unnest(...)` and `INSERT ... SELECT FROM unnest(...)`, one short
  statement per batch whatever its size (cheap to parse, prepared once by psycopg).
- SQLite: every write transaction is BEGIN IMMEDIATE (billing.db.engine), so nothing changes a row between
  this transaction's read and its write; `IN` lists and executemany.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, any_, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def dialect_of(session: Session) -> str:
    return session.get_bind().dialect.name


def id_in(column: Any, ids: Sequence[int], dialect: str) -> ColumnElement[bool]:
    """`column IN ids`: one array parameter on PostgreSQL (a short statement whatever the count)."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=ARRAY(BigInteger)))  # type: ignore[no-any-return]
    return column.in_(list(ids))  # type: ignore[no-any-return]


def lock_rows(
    session: Session, model: Any, ids: Iterable[int], *columns: str, skip_locked: bool = False
) -> dict[int, Any]:
    """Lock the rows with these ids (PostgreSQL; SQLite's writer lock already covers them), in id order, and
    return id -> row of the named columns. With skip_locked, rows another transaction holds are left out."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    table = model.__table__  # Core columns: no ORM compile step for a statement that builds no objects
    query = (
        select(table.c.id, *(table.c[c] for c in columns))
        .where(id_in(table.c.id, ids, dialect_of(session)))
        .order_by(table.c.id)
        .with_for_update(skip_locked=skip_locked)
    )
    return {row.id: row for row in session.execute(query)}


def _pg_column(values: list[Any]) -> list[Any]:
    """A column's values as psycopg dumps them in a binary array (enums by value, dicts as JSON)."""
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, enum.Enum):
        return [None if v is None else v.value for v in values]
    if isinstance(sample, dict | list):
        from psycopg.types.json import Json

        return [None if v is None else Json(v) for v in values]
    return values


def _pg_type(table: Any, column: str) -> str:
    return str(table.c[column].type.compile(dialect=_PG))


def _pg_execute(session: Session, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Run one statement on the session's connection, in its transaction, with binary parameters (`%b`):
    psycopg dumps a binary array without the per-element escaping its text format does."""
    session.flush()
    driver = session.connection().connection.driver_connection
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []


def _unnest(
    table: Any, columns: Sequence[str], rows: Sequence[dict[str, Any]], constants: Mapping[str, Any] | None = None
) -> tuple[str, list[Any]]:
    """`unnest(%b::type[], ...) AS v(columns, *constants)` and its parameters (one array per column):
    `constants` are further columns with the same value in every row (no per-row copies of the rows)."""
    constants = constants or {}
    params = [_pg_column([row[c] for row in rows]) for c in columns]
    params += [_pg_column([value] * len(rows)) for value in constants.values()]
    names = [*columns, *constants]
    arrays = ", ".join(f"%b::{_pg_type(table, c)}[]" for c in names)
    return f"unnest({arrays}) AS v({', '.join(names)})", params


def update_rows(
    session: Session, model: Any, rows: Sequence[dict[str, Any]], key: str = "id", unless_changed: str | None = None
) -> None:
    """Write each row's values to the row whose `key` column matches (every row has the same keys). No state
    condition (check states with lock_rows first), except `unless_changed`: a column that must still hold the
    row's value under the key `old_<column>` (a counter compare-and-set; the column must not be indexed)."""
    if not rows:
        return
    table = model.__table__
    guard = f"old_{unless_changed}" if unless_changed else None
    columns = [c for c in rows[0] if c not in (key, guard)]
    rows = sorted(rows, key=lambda r: r[key])
    if dialect_of(session) == "postgresql":
        arrays = [key, *columns]
        source, params = _unnest(table, arrays, rows)
        condition = f"t.{key} = v.{key}"
        if unless_changed and guard:
            source = source.replace(") AS v(", f", %b::{_pg_type(table, unless_changed)}[]) AS v(", 1)
            source = source[:-1] + f", {guard})"
            params.append([row[guard] for row in rows])
            condition += f" AND t.{unless_changed} = v.{guard}"
        assignments = ", ".join(f"{c} = v.{c}" for c in columns)
        _pg_execute(session, f"UPDATE {table.name} AS t SET {assignments} FROM {source} WHERE {condition}", params)
        return
    where = table.c[key] == bindparam(f"b_{key}")
    if unless_changed:
        where = where & (table.c[unless_changed] == bindparam(f"b_{guard}"))
    stmt = update(table).where(where).values({c: bindparam(f"b_{c}") for c in columns})
    session.execute(stmt, [{f"b_{k}": v for k, v in row.items()} for row in rows])


def update_ids(session: Session, model: Any, ids: Sequence[int], **values: Any) -> None:
    """The same values for every row with these ids (no other condition: check states with lock_rows first)."""
    if ids:
        table = model.__table__
        session.execute(update(table).where(id_in(table.c.id, ids, dialect_of(session))).values(**values))


def insert_rows(
    session: Session,
    model: Any,
    rows: Sequence[dict[str, Any]],
    *,
    returning: Sequence[str] = (),
    on_conflict_do_nothing: bool = False,
    conflict_columns: Sequence[str] | None = None,
) -> list[Any]:
    """Insert rows (all with the same keys) in one statement; with returning, the inserted rows' columns (rows
    skipped by ON CONFLICT DO NOTHING return nothing)."""
    if not rows:
        return []
    table = model.__table__
    columns = list(rows[0])
    if dialect_of(session) == "postgresql":
        # SQLAlchemy fills Python-side column defaults into its own INSERTs; this one is raw SQL.
        defaults = {
            c.name: c.default.arg(None) if c.default.is_callable else c.default.arg
            for c in table.columns
            if c.name not in columns and c.default is not None and (c.default.is_scalar or c.default.is_callable)
        }
        source, params = _unnest(table, columns, rows, constants=defaults)
        columns += list(defaults)
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT * FROM {source}"
        if on_conflict_do_nothing:
            target = f" ({', '.join(conflict_columns)})" if conflict_columns else ""
            sql += f" ON CONFLICT{target} DO NOTHING"
        if returning:
            sql += f" RETURNING {', '.join(returning)}"
        return _pg_execute(session, sql, params)
    stmt: Any = sqlite.insert(table)
    if on_conflict_do_nothing:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict_columns) if conflict_columns else None)
    if returning:
        stmt = stmt.returning(*(table.c[c] for c in returning))
    result = session.execute(stmt, list(rows))
    return list(result.all()) if returning else []
