"""Settings from the environment (a `.env` file in the working directory may add defaults)."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from billing.domain.dunning import MAX_WINDOW_DAYS, check_retry_days

DEFAULT_TPAGA_API_URL = "https://sandbox.tpaga.co/api/"
DEFAULT_DATABASE_URL = "sqlite:///billing.db"
DUNNING_POLICIES = ("colombia", "fixed")
DEFAULT_BROKER_URL = "sqla+sqlite:///celery-broker.db"
DEFAULT_RATE_LIMIT_MAX_WAIT_SECONDS = 10.0
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class ConfigError(ValueError):
    """Raised when a setting is missing or malformed; the message names the variable."""


def describe_config_error(exc: ConfigError) -> str:
    """The one line every program of this project shows for a bad setting (`billing`, `celery -A tasks`)."""
    return f"configuration: {exc}"


def _load_dotenv() -> None:
    path = Path.cwd() / ".env"
    if path.is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address: only "localhost" counts
        return False


def is_loopback_host(host: str | None) -> bool:
    """Whether a URL's host is this machine: "localhost" or a loopback address."""
    return host is not None and (host.lower() in LOOPBACK_HOSTS or _is_loopback_ip(host))


def validate_api_url(url: str) -> str:
    """Require https except for loopback hosts; return the URL with a trailing slash."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"TPAGA_API_URL must be an http(s) URL, got {url!r}")
    if parsed.scheme != "https" and not is_loopback_host(parsed.hostname):
        raise ConfigError("TPAGA_API_URL must use https unless it points at a loopback address")
    return url if url.endswith("/") else url + "/"


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _days(env: dict[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name)
    if not raw:
        return default
    try:
        days = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated whole days, e.g. 1,3,5,7; got {raw!r}") from None
    try:
        return check_retry_days(days) if days else check_retry_days(None)
    except ValueError:
        raise ConfigError(f"{name} must be strictly increasing positive days, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Every knob of the worker. Secrets are excluded from repr."""

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    tpaga_api_url: str = DEFAULT_TPAGA_API_URL
    tpaga_private_key: str | None = field(default=None, repr=False)
    tpaga_public_key: str | None = field(default=None, repr=False)
    refund_window: str = "24h"
    timezone: str = "America/Bogota"
    dunning_retry_days: tuple[int, ...] = (1, 3, 5, 7)
    dunning_final_action: str = "unpaid"
    # "colombia": retries timed by decline reason on Colombia's pay calendar; "fixed": dunning_retry_days.
    dunning_policy: str = "colombia"
    dunning_window_days: int = 21
    dunning_payday_hour: int = 9
    clock: str = "system"
    connect_timeout_seconds: float = 3.05
    read_timeout_seconds: float = 20.0
    sending_lease_seconds: int = 300
    gateway_rate_limit_per_second: float = 0.0
    rate_limit_max_wait_seconds: float = DEFAULT_RATE_LIMIT_MAX_WAIT_SECONDS
    # Advance notices in the event stream (docs/events.md), days ahead; 0 turns one off.
    card_expiring_days: int = 30
    trial_notice_days: int = 3
    renewal_notice_days: int = 7

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        if environ is None:
            _load_dotenv()
            env = dict(os.environ)
        else:
            env = dict(environ)
        refund_window = env.get("BILLING_REFUND_WINDOW", "24h") or "24h"
        if refund_window not in ("24h", "same_day"):
            raise ConfigError(f"BILLING_REFUND_WINDOW must be '24h' or 'same_day', got {refund_window!r}")
        final_action = env.get("BILLING_DUNNING_FINAL_ACTION", "unpaid") or "unpaid"
        if final_action not in ("unpaid", "canceled"):
            raise ConfigError(f"BILLING_DUNNING_FINAL_ACTION must be 'unpaid' or 'canceled', got {final_action!r}")
        dunning_policy = env.get("BILLING_DUNNING_POLICY", "colombia") or "colombia"
        if dunning_policy not in DUNNING_POLICIES:
            raise ConfigError(f"BILLING_DUNNING_POLICY must be 'colombia' or 'fixed', got {dunning_policy!r}")
        clock = env.get("BILLING_CLOCK", "system") or "system"
        if clock not in ("system", "database"):
            raise ConfigError(f"BILLING_CLOCK must be 'system' or 'database', got {clock!r}")
        tz = env.get("BILLING_TIMEZONE", "America/Bogota") or "America/Bogota"
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
        except Exception:
            raise ConfigError(f"BILLING_TIMEZONE is not a known time zone: {tz!r}") from None
        settings = cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            broker_url=env.get("CELERY_BROKER_URL") or DEFAULT_BROKER_URL,
            tpaga_api_url=validate_api_url(env.get("TPAGA_API_URL") or DEFAULT_TPAGA_API_URL),
            tpaga_private_key=env.get("TPAGA_PRIVATE_KEY") or None,
            tpaga_public_key=env.get("TPAGA_PUBLIC_KEY") or None,
            refund_window=refund_window,
            timezone=tz,
            dunning_retry_days=_days(env, "BILLING_DUNNING_RETRY_DAYS", (1, 3, 5, 7)),
            dunning_final_action=final_action,
            dunning_policy=dunning_policy,
            dunning_window_days=_int(env, "BILLING_DUNNING_WINDOW_DAYS", 21, 1, MAX_WINDOW_DAYS),
            dunning_payday_hour=_int(env, "BILLING_DUNNING_PAYDAY_HOUR", 9, 0, 23),
            clock=clock,
            connect_timeout_seconds=_float(env, "TPAGA_CONNECT_TIMEOUT", 3.05, 0.01),
            read_timeout_seconds=_float(env, "TPAGA_READ_TIMEOUT", 20.0, 0.01),
            sending_lease_seconds=_int(env, "BILLING_SENDING_LEASE_SECONDS", 300, 1),
            gateway_rate_limit_per_second=_float(env, "TPAGA_RATE_LIMIT", 0.0, 0.0),
            rate_limit_max_wait_seconds=_float(
                env, "TPAGA_RATE_LIMIT_MAX_WAIT", DEFAULT_RATE_LIMIT_MAX_WAIT_SECONDS, 0.0
            ),
            card_expiring_days=_int(env, "BILLING_CARD_EXPIRING_DAYS", 30, 0),
            trial_notice_days=_int(env, "BILLING_TRIAL_NOTICE_DAYS", 3, 0),
            renewal_notice_days=_int(env, "BILLING_RENEWAL_NOTICE_DAYS", 7, 0),
        )
        minimum = settings.minimum_sending_lease_seconds()
        if settings.sending_lease_seconds < minimum:
            raise ConfigError(
                f"BILLING_SENDING_LEASE_SECONDS must be at least {minimum} (the longest a charge call may take: "
                f"TPAGA_RATE_LIMIT_MAX_WAIT, TPAGA_CONNECT_TIMEOUT and TPAGA_READ_TIMEOUT, and the retries of a "
                f"request that was not sent), got {settings.sending_lease_seconds}"
            )
        return settings

    def minimum_sending_lease_seconds(self) -> int:
        """The shortest sending lease that outlasts a charge call: its time budget, in whole seconds."""
        from billing.gateway.retry import call_budget_seconds  # the gateway imports this module

        budget = call_budget_seconds(
            rate_limit_max_wait_seconds=self.rate_limit_max_wait_seconds if self.gateway_rate_limit_per_second else 0,
            connect_timeout_seconds=self.connect_timeout_seconds,
            read_timeout_seconds=self.read_timeout_seconds,
        )
        return math.ceil(budget)
