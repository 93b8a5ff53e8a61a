"""`billing sandbox`: run the bundled Tpaga emulator."""

from __future__ import annotations

import click

from billing.sandbox.faults import MAX_LATENCY_MS
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, run

_RATE = click.FloatRange(0.0, 1.0)


@click.command()
@click.option("--host", envvar="TPAGA_SANDBOX_HOST", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    envvar="TPAGA_SANDBOX_PORT",
    type=click.IntRange(0, 65535),
    default=8090,
    show_default=True,
    help="TCP port; 0 picks a free one.",
)
@click.option(
    "--private-key",
    envvar="TPAGA_SANDBOX_PRIVATE_KEY",
    default=DEFAULT_PRIVATE_KEY,
    show_default=True,
    help="Key accepted on every endpoint but tokenize.",
)
@click.option(
    "--public-key",
    envvar="TPAGA_SANDBOX_PUBLIC_KEY",
    default=DEFAULT_PUBLIC_KEY,
    show_default=True,
    help="Key accepted only on POST tokenize/credit_card.",
)
@click.option(
    "--latency-ms",
    envvar="TPAGA_SANDBOX_LATENCY_MS",
    type=click.IntRange(0, MAX_LATENCY_MS),
    default=0,
    show_default=True,
    help="Delay added to every /api request.",
)
@click.option(
    "--error-rate",
    envvar="TPAGA_SANDBOX_ERROR_RATE",
    type=_RATE,
    default=0.0,
    show_default=True,
    help="Share of charges/refunds answered 502/504 without being made.",
)
@click.option(
    "--drop-rate",
    envvar="TPAGA_SANDBOX_DROP_RATE",
    type=_RATE,
    default=0.0,
    show_default=True,
    help="Share of charges/refunds made whose connection is then dropped.",
)
@click.option(
    "--garbage-rate",
    envvar="TPAGA_SANDBOX_GARBAGE_RATE",
    type=_RATE,
    default=0.0,
    show_default=True,
    help="Share of charges/refunds made whose answer is unreadable.",
)
@click.option(
    "--refund-window",
    envvar="TPAGA_SANDBOX_REFUND_WINDOW",
    type=click.Choice(["24h", "same_day"]),
    default="24h",
    show_default=True,
    help="Void window: 24 hours after approval, or the same day in America/Bogota.",
)
@click.option(
    "--seed",
    envvar="TPAGA_SANDBOX_SEED",
    type=int,
    default=None,
    help="Seed for ids and random faults, to replay a run.",
)
@click.option(
    "--strict/--lenient",
    envvar="TPAGA_SANDBOX_STRICT",
    default=False,
    show_default=True,
    help="Strict: only Tpaga's documented request shapes. Lenient (default): converts like Tpaga (docs/sandbox.md).",
)
def sandbox(
    host: str,
    port: int,
    private_key: str,
    public_key: str,
    latency_ms: int,
    error_rate: float,
    drop_rate: float,
    garbage_rate: float,
    refund_window: str,
    seed: int | None,
    strict: bool,
) -> None:
    """Run the Tpaga sandbox emulator: Tpaga's API under /api/, test controls under /__sandbox/."""
    config = SandboxConfig(
        host=host,
        port=port,
        private_key=private_key,
        public_key=public_key,
        latency_ms=latency_ms,
        error_rate=error_rate,
        drop_rate=drop_rate,
        garbage_rate=garbage_rate,
        refund_window=refund_window,
        seed=seed,
        strict=strict,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run(config)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
