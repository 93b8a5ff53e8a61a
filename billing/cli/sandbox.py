"""`billing sandbox`: run the bundled Tpaga emulator."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import click

from billing.sandbox.faults import MAX_LATENCY_MS
from billing.sandbox.money import FEE_RATE, FIXED_FEE, RETE_ICA_RATE, RETE_IVA_RATE, RETE_RENTA_RATE
from billing.sandbox.server import DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY, SandboxConfig, run

_RATE = click.FloatRange(0.0, 1.0)


class _Exact(click.ParamType[Decimal]):
    """An exact decimal (the settlement formula's figures are money: never a float)."""

    name = "decimal"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Decimal:
        if isinstance(value, Decimal):
            return value
        try:
            exact = Decimal(str(value).strip())
        except InvalidOperation:
            exact = Decimal("NaN")
        if not exact.is_finite():
            self.fail(f"{value!r} is not a decimal number", param, ctx)
        return exact


_EXACT = _Exact()
# (option, SandboxConfig field, help): the settlement breakdown's formula (docs/sandbox.md, Fees).
_SETTLEMENT_OPTIONS = (
    ("--fee-fixed", "fee_fixed", FIXED_FEE, "Tpaga's fixed fee per charge, pesos."),
    ("--fee-rate", "fee_rate", FEE_RATE, "Tpaga's fee as a share of the amount (0 to 0.2)."),
    ("--rete-renta-rate", "rete_renta_rate", RETE_RENTA_RATE, "reteRenta as a share of the base (0 to 0.2)."),
    ("--rete-ica-rate", "rete_ica_rate", RETE_ICA_RATE, "reteICA as a share of the base (0 to 0.2)."),
    ("--rete-iva-rate", "rete_iva_rate", RETE_IVA_RATE, "reteIVA as a share of taxAmount (0 to 0.2)."),
)


def _settlement_options(command: Callable[..., None]) -> Callable[..., None]:
    for option, field, default, text in reversed(_SETTLEMENT_OPTIONS):
        envvar = "TPAGA_SANDBOX_" + field.upper()
        command = click.option(
            option, field, envvar=envvar, type=_EXACT, default=default, show_default=True, help=text
        )(command)
    return command


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
@_settlement_options
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
    **rates: Decimal,
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
        **rates,
    )
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run(config)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
