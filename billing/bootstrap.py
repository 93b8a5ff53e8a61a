"""Wiring: build engine, sessions, gateway, clock and policy from Settings, once per process."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.clock import Clock, SystemClock
from billing.config import Settings
from billing.db.control import DatabaseClock
from billing.db.engine import make_engine, make_session_factory
from billing.domain.dunning import AnyDunningPolicy, ColombiaPolicy, DunningPolicy
from billing.services.context import Context, Gateway, Publisher


def build_clock(settings: Settings, sessions: sessionmaker[Session]) -> Clock:
    """The system clock, or the database-shared test clock (`BILLING_CLOCK=database`) for demos and tests."""
    return DatabaseClock(sessions) if settings.clock == "database" else SystemClock()


def build_gateway(settings: Settings) -> Gateway:
    from billing.gateway import TpagaClient

    return TpagaClient.from_settings(settings)


def build_policy(settings: Settings) -> AnyDunningPolicy:
    """The dunning policy BILLING_DUNNING_POLICY names, with its settings."""
    if settings.dunning_policy == "fixed":
        return DunningPolicy(retry_days=settings.dunning_retry_days, final_action=settings.dunning_final_action)
    return ColombiaPolicy(
        window_days=settings.dunning_window_days,
        payday_hour=settings.dunning_payday_hour,
        final_action=settings.dunning_final_action,
    )


def build_context(
    settings: Settings,
    *,
    engine: Engine | None = None,
    gateway: Gateway | None = None,
    clock: Clock | None = None,
    publisher: Publisher | None = None,
) -> Context:
    engine = engine or make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    return Context(
        sessions=sessions,
        gateway=gateway if gateway is not None else build_gateway(settings),
        clock=clock or build_clock(settings, sessions),
        policy=build_policy(settings),
        timezone=settings.timezone,
        refund_window=settings.refund_window,
        sending_lease=timedelta(seconds=settings.sending_lease_seconds),
        answer_time=timedelta(seconds=settings.connect_timeout_seconds + settings.read_timeout_seconds),
        publisher=publisher,
        card_expiring_notice=timedelta(days=settings.card_expiring_days),
        trial_notice=timedelta(days=settings.trial_notice_days),
        renewal_notice=timedelta(days=settings.renewal_notice_days),
    )
