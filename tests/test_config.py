"""Settings from the environment: defaults, validation with messages that name the variable."""

from __future__ import annotations

import pytest

from billing.config import ConfigError, Settings, validate_api_url


def test_defaults_are_the_embedded_setup():
    s = Settings.from_env({})
    assert s.database_url == "sqlite:///billing.db"
    assert s.broker_url.startswith("sqla+sqlite://")
    assert s.tpaga_api_url == "https://sandbox.tpaga.co/api/"
    assert s.refund_window == "24h" and s.dunning_retry_days == (1, 3, 5, 7)


def test_secrets_stay_out_of_the_settings_repr():
    s = Settings.from_env({"TPAGA_PRIVATE_KEY": "very-secret-key", "TPAGA_PUBLIC_KEY": "pk_secret"})
    assert "very-secret-key" not in repr(s) and "pk_secret" not in repr(s)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8090/api/",
        "http://localhost:8090/api",
        "http://[::1]:80/api/",
        "http://127.3.4.5/api/",
        "https://api.tpaga.co/api/",
    ],
)
def test_https_or_loopback_urls_are_accepted(url: str):
    assert validate_api_url(url).endswith("/")


@pytest.mark.parametrize(
    "url", ["http://api.tpaga.co/api/", "http://127.evil.example/api/", "ftp://127.0.0.1/", "not a url", "http://"]
)
def test_plain_http_to_a_remote_host_is_refused(url: str):
    with pytest.raises(ConfigError, match="TPAGA_API_URL"):
        validate_api_url(url)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"BILLING_REFUND_WINDOW": "48h"}, "BILLING_REFUND_WINDOW"),
        ({"BILLING_DUNNING_RETRY_DAYS": "3,1"}, "BILLING_DUNNING_RETRY_DAYS"),
        ({"BILLING_DUNNING_RETRY_DAYS": "a,b"}, "BILLING_DUNNING_RETRY_DAYS"),
        ({"BILLING_DUNNING_FINAL_ACTION": "delete"}, "BILLING_DUNNING_FINAL_ACTION"),
        ({"BILLING_CLOCK": "fake"}, "BILLING_CLOCK"),
        ({"BILLING_TIMEZONE": "Mars/Olympus"}, "BILLING_TIMEZONE"),
        ({"TPAGA_READ_TIMEOUT": "soon"}, "TPAGA_READ_TIMEOUT"),
        ({"BILLING_SENDING_LEASE_SECONDS": "0"}, "BILLING_SENDING_LEASE_SECONDS"),
        ({"TPAGA_RATE_LIMIT": "-1"}, "TPAGA_RATE_LIMIT"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], name: str):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("max_wait", "connect", "read", "attempts", "budget"),
    [
        (10.0, 3.05, 20.0, 3, 10 + 3 * 3.05 + (0.25 + 0.5) + 20),  # the defaults
        (0.0, 3.05, 20.0, 3, 3 * 3.05 + 0.75 + 20),  # no rate limit: no limiter wait
        (0.0, 1.0, 2.0, 1, 1 + 2),  # no retry: one connect and one read
        (0.0, 1.0, 2.0, 2, 2 * 1 + 0.25 + 2),
        (5.0, 1.0, 2.0, 6, 5 + 6 * 1 + (0.25 + 0.5 + 1 + 2 + 2) + 2),  # backoffs capped at 2 s
    ],
)
def test_the_call_budget_of_a_charge(max_wait: float, connect: float, read: float, attempts: int, budget: float):
    from billing.gateway.retry import call_budget_seconds

    got = call_budget_seconds(
        rate_limit_max_wait_seconds=max_wait,
        connect_timeout_seconds=connect,
        read_timeout_seconds=read,
        attempts=attempts,
    )
    assert got == pytest.approx(budget)


@pytest.mark.parametrize(
    ("env", "minimum"),
    [
        ({"BILLING_SENDING_LEASE_SECONDS": "29"}, 30),  # 29.9 s without a rate limit
        ({"BILLING_SENDING_LEASE_SECONDS": "39", "TPAGA_RATE_LIMIT": "50"}, 40),  # + the 10 s max wait
        ({"BILLING_SENDING_LEASE_SECONDS": "5", "TPAGA_CONNECT_TIMEOUT": "1", "TPAGA_READ_TIMEOUT": "2"}, 6),
        ({"BILLING_SENDING_LEASE_SECONDS": "300", "TPAGA_READ_TIMEOUT": "600"}, 610),
        (
            {"BILLING_SENDING_LEASE_SECONDS": "60", "TPAGA_RATE_LIMIT": "5", "TPAGA_RATE_LIMIT_MAX_WAIT": "40"},
            70,
        ),
    ],
)
def test_a_sending_lease_shorter_than_a_charge_call_is_refused(env: dict[str, str], minimum: int):
    assert int(env["BILLING_SENDING_LEASE_SECONDS"]) < minimum
    with pytest.raises(ConfigError, match=rf"BILLING_SENDING_LEASE_SECONDS must be at least {minimum}\b"):
        Settings.from_env(env)
    accepted = Settings.from_env({**env, "BILLING_SENDING_LEASE_SECONDS": str(minimum)})
    assert accepted.sending_lease_seconds == minimum == accepted.minimum_sending_lease_seconds()


def test_the_rate_limiter_max_wait_is_a_setting():
    assert Settings.from_env({}).rate_limit_max_wait_seconds == 10.0
    assert Settings.from_env({"TPAGA_RATE_LIMIT_MAX_WAIT": "2.5"}).rate_limit_max_wait_seconds == 2.5
    for bad in ("-1", "soon"):
        with pytest.raises(ConfigError, match="TPAGA_RATE_LIMIT_MAX_WAIT"):
            Settings.from_env({"TPAGA_RATE_LIMIT_MAX_WAIT": bad})
