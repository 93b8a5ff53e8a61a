"""Database-backed switches: the test clock offset and the billing pause."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from billing.clock import Clock, SystemClock
from billing.db.models import Control

CLOCK_OFFSET_KEY = "clock_offset_seconds"
PAUSE_KEY = "billing_paused"


def get_value(session: Session, key: str) -> str | None:
    return session.execute(select(Control.value).where(Control.key == key)).scalar_one_or_none()


def set_value(session: Session, key: str, value: str, now: datetime) -> None:
    row = session.get(Control, key)
    if row is None:
        session.add(Control(key=key, value=value, updated_at=now))
    else:
        row.value = value
        row.updated_at = now


def insert_if_absent(session: Session, key: str, value: str, now: datetime) -> bool:
    """Store `key` unless it exists; True when this call stored it. Concurrent callers never fail: the loser of
    a race does nothing (INSERT ... ON CONFLICT DO NOTHING), where a plain insert would raise a unique
    violation at commit and roll back the caller's whole transaction."""
    dialect = session.get_bind().dialect.name
    insert: Any = postgresql.insert(Control) if dialect == "postgresql" else sqlite.insert(Control)
    stmt = (
        insert.values(key=key, value=value, updated_at=now)
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(Control.key)
    )
    return session.execute(stmt).scalar_one_or_none() is not None


def delete_value(session: Session, key: str) -> None:
    row = session.get(Control, key)
    if row is not None:
        session.delete(row)


def get_pause(session: Session) -> dict[str, Any] | None:
    raw = get_value(session, PAUSE_KEY)
    return json.loads(raw) if raw else None


class DatabaseClock:
    """System time plus an offset stored in the database, so every process shares one test clock.

    The offset is cached for `ttl_seconds` to keep the hot path free of extra queries.
    """

    def __init__(self, factory: sessionmaker[Session], ttl_seconds: float = 0.5) -> None:
        self._factory = factory
        self._ttl = ttl_seconds
        self._base: Clock = SystemClock()
        self._lock = threading.Lock()
        self._offset = 0.0
        self._read_at = -1e18

    def offset_seconds(self) -> float:
        with self._lock:
            mono = time.monotonic()
            if mono - self._read_at > self._ttl:
                with self._factory() as session:
                    raw = get_value(session, CLOCK_OFFSET_KEY)
                self._offset = float(raw) if raw else 0.0
                self._read_at = mono
            return self._offset

    def now(self) -> datetime:
        return self._base.now() + timedelta(seconds=self.offset_seconds())

    def advance(self, delta: timedelta) -> datetime:
        """Move the shared clock forward (never back) and return the new time."""
        if delta < timedelta(0):
            raise ValueError("the clock never goes backwards")
        with self._factory() as session, session.begin():
            raw = get_value(session, CLOCK_OFFSET_KEY)
            offset = (float(raw) if raw else 0.0) + delta.total_seconds()
            set_value(session, CLOCK_OFFSET_KEY, repr(offset), self._base.now())
        with self._lock:
            self._offset = offset
            self._read_at = time.monotonic()
        return self.now()
