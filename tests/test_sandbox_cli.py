"""`billing sandbox`: its options, their environment variables, and a real subprocess."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import pytest
import requests
from click.testing import CliRunner

from billing.cli import main
from billing.sandbox import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, SandboxThread

OPTIONS = (
    "--host",
    "--port",
    "--private-key",
    "--public-key",
    "--latency-ms",
    "--error-rate",
    "--drop-rate",
    "--garbage-rate",
    "--refund-window",
    "--strict",
)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[SandboxConfig]:
    """Replaces the blocking server with a recorder of the config it would have run."""
    configs: list[SandboxConfig] = []
    monkeypatch.setattr("billing.cli.sandbox.run", configs.append)
    return configs


def test_help_lists_every_option() -> None:
    result = CliRunner().invoke(main, ["sandbox", "--help"])

    assert result.exit_code == 0
    for option in OPTIONS:
        assert option in result.output


def test_defaults_are_the_blogs_keys_on_loopback_port_8090(captured: list[SandboxConfig]) -> None:
    result = CliRunner().invoke(main, ["sandbox"], env={name: None for name in _env_names()})

    assert result.exit_code == 0, result.output
    (config,) = captured
    assert (config.host, config.port) == ("127.0.0.1", 8090)
    assert (config.private_key, config.public_key) == (DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)
    assert (config.latency_ms, config.error_rate, config.drop_rate, config.garbage_rate) == (0, 0.0, 0.0, 0.0)
    assert config.refund_window == "24h"
    assert config.strict is False  # lenient like Tpaga unless told


def test_every_option_reads_its_environment_variable(captured: list[SandboxConfig]) -> None:
    env = {
        "TPAGA_SANDBOX_HOST": "0.0.0.0",
        "TPAGA_SANDBOX_PORT": "9000",
        "TPAGA_SANDBOX_PRIVATE_KEY": "priv",
        "TPAGA_SANDBOX_PUBLIC_KEY": "pub",
        "TPAGA_SANDBOX_LATENCY_MS": "50",
        "TPAGA_SANDBOX_ERROR_RATE": "0.1",
        "TPAGA_SANDBOX_DROP_RATE": "0.2",
        "TPAGA_SANDBOX_GARBAGE_RATE": "0.3",
        "TPAGA_SANDBOX_REFUND_WINDOW": "same_day",
        "TPAGA_SANDBOX_STRICT": "1",
    }

    result = CliRunner().invoke(main, ["sandbox"], env=env)

    assert result.exit_code == 0, result.output
    assert captured == [
        SandboxConfig(
            host="0.0.0.0",
            port=9000,
            private_key="priv",
            public_key="pub",
            latency_ms=50,
            error_rate=0.1,
            drop_rate=0.2,
            garbage_rate=0.3,
            refund_window="same_day",
            strict=True,
        )
    ]


@pytest.mark.parametrize(("args", "strict"), [(["--strict"], True), (["--lenient"], False), ([], False)])
def test_strict_is_a_flag(captured: list[SandboxConfig], args: list[str], strict: bool) -> None:
    result = CliRunner().invoke(main, ["sandbox", *args], env={"TPAGA_SANDBOX_STRICT": None})

    assert result.exit_code == 0, result.output
    assert captured[0].strict is strict


def test_options_win_over_the_environment(captured: list[SandboxConfig]) -> None:
    result = CliRunner().invoke(main, ["sandbox", "--latency-ms", "5"], env={"TPAGA_SANDBOX_LATENCY_MS": "50"})

    assert result.exit_code == 0
    assert captured[0].latency_ms == 5


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--error-rate", "1.5"], {}, "--error-rate"),
        (["--drop-rate", "-0.1"], {}, "--drop-rate"),
        (["--garbage-rate", "lots"], {}, "--garbage-rate"),
        (["--latency-ms", "-5"], {}, "--latency-ms"),
        (["--refund-window", "weekly"], {}, "--refund-window"),
        (["--port", "70000"], {}, "--port"),
        ([], {"TPAGA_SANDBOX_DROP_RATE": "2"}, "--drop-rate"),
        ([], {"TPAGA_SANDBOX_REFUND_WINDOW": "48h"}, "--refund-window"),
        ([], {"TPAGA_SANDBOX_STRICT": "sometimes"}, "--strict"),
        (["--public-key", DEFAULT_PRIVATE_KEY], {}, "differ"),
    ],
)
def test_bad_values_fail_with_a_clear_message(
    captured: list[SandboxConfig], args: list[str], env: dict[str, str], named: str
) -> None:
    result = CliRunner().invoke(main, ["sandbox", *args], env=env)

    assert result.exit_code == 2
    assert named in result.output
    assert captured == []


def test_a_port_already_in_use_is_a_clear_error(sandbox: SandboxThread) -> None:
    result = CliRunner().invoke(main, ["sandbox", "--port", str(sandbox.port)])

    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{sandbox.port}" in result.output


def test_the_command_serves_until_terminated() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from billing.cli import main; main()", "sandbox", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TPAGA_SANDBOX_")},
    )
    try:
        line = _first_line(process, timeout_seconds=20)
        assert line == (
            f"Tpaga sandbox listening on http://127.0.0.1:{port}/api/ "
            f"(private key {DEFAULT_PRIVATE_KEY}, public key {DEFAULT_PUBLIC_KEY})"
        )
        response = requests.post(
            f"http://127.0.0.1:{port}/api/customer", json={}, auth=(DEFAULT_PRIVATE_KEY, ""), timeout=10
        )
        assert response.status_code == 201

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stderr is not None
        assert process.stderr.read() == ""  # nothing logged on a clean start and stop
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _first_line(process: subprocess.Popen[str], timeout_seconds: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_seconds).rstrip("\n")
    except queue.Empty:
        pytest.fail("billing sandbox printed no listening line in time")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env_names() -> list[str]:
    return ["TPAGA_SANDBOX_" + option.removeprefix("--").replace("-", "_").upper() for option in OPTIONS] + [
        "TPAGA_SANDBOX_SEED"
    ]
