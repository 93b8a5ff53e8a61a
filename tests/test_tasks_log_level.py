"""A worker and beat started by `celery -A tasks ...` log at BILLING_LOG_LEVEL (default INFO) unless --loglevel is
given: with Celery's own default (WARNING) a worker prints nothing after its banner, whatever work it does."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from tasks.app import _log_level, task_settings
from tasks.testing import CeleryProcess, process_env


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    task_settings.cache_clear()
    yield
    task_settings.cache_clear()


def _level_seen(args: list[str]) -> Any:
    """What a worker started with `args` gets, inside a command shaped like Celery's (default WARNING)."""
    seen: list[Any] = []

    @click.command()
    @click.option("--loglevel", default="WARNING")
    def command(loglevel: str) -> None:
        seen.append(_log_level(loglevel))

    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize(
    ("env", "args", "level"),
    [
        ({}, [], "INFO"),  # unset: INFO, so the README's `celery -A tasks worker` shows its tasks
        ({"BILLING_LOG_LEVEL": "debug"}, [], "DEBUG"),
        ({"BILLING_LOG_LEVEL": "ERROR"}, [], "ERROR"),
        ({"BILLING_LOG_LEVEL": "DEBUG"}, ["--loglevel", "WARNING"], "WARNING"),  # the command line wins
    ],
)
def test_the_level_is_the_command_lines_else_billing_log_level_else_info(
    fresh_settings: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], level: str
) -> None:
    monkeypatch.delenv("BILLING_LOG_LEVEL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _level_seen(args) == level


def test_outside_the_celery_command_the_level_is_left_as_given(fresh_settings: None) -> None:
    # An embedding program that builds app.Worker itself keeps the level it passes.
    assert _log_level(logging.ERROR) == logging.ERROR


def test_a_worker_started_without_loglevel_logs_at_billing_log_level(tmp_path: Path) -> None:
    env = process_env(
        {
            "BILLING_LOG_LEVEL": "debug",
            "DATABASE_URL": f"sqlite:///{tmp_path}/billing.db",
            "CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path}/broker.db",
        }
    )
    args = ["worker", "--pool", "solo", "--without-mingle", "--without-gossip", "-n", "loglevel@%h"]
    with CeleryProcess(args, env, tmp_path / "worker.log", cwd=tmp_path) as proc:
        proc.wait_for_log(r"INFO/MainProcess\] loglevel@\S+ ready\.", 90)
        assert "DEBUG/MainProcess]" in proc.log_text()
