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
