"""Two workers that see a 401 at the same moment both pause billing: one pause and one event are recorded, and
neither transaction fails (a unique violation would roll back every charge outcome it was recording)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from billing.db import control, migrate
from billing.db.engine import make_engine, make_session_factory
from billing.db.models import Event
from billing.services.pause import pause_billing

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _race(url: str) -> None:
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    first_inserted = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with sessions() as session, session.begin():
                pause_billing(session, NOW, "unauthorized", None)
                first_inserted.set()
                time.sleep(0.5)  # still uncommitted while the second worker pauses too
        except BaseException as exc:
            errors.append(exc)
            first_inserted.set()

    def second() -> None:
        first_inserted.wait(10)
        try:
            with sessions() as session, session.begin():
                pause_billing(session, NOW, "unauthorized", None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == []
        with sessions() as session:
            assert control.get_pause(session) == {
                "reason": "unauthorized",
                "error_code": None,
                "since": NOW.isoformat(),
            }
            kinds = session.execute(select(func.count(Event.id)).where(Event.kind == "billing.paused")).scalar_one()
        assert kinds == 1
        # Pausing again in one transaction (two 401s in one batch) is as quiet.
        with sessions() as session, session.begin():
            pause_billing(session, NOW, "unauthorized", None)
            pause_billing(session, NOW, "merchant_decline", "5003")
        with sessions() as session:
            assert control.get_pause(session)["reason"] == "unauthorized"  # type: ignore[index]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_concurrent_pauses_on_postgresql_record_one_and_fail_none(pg_url: str) -> None:
    _race(pg_url)


def test_concurrent_pauses_on_sqlite_record_one_and_fail_none(sqlite_url: str) -> None:
    _race(sqlite_url)
