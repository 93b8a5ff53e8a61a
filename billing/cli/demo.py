"""`billing demo`: the embedded end-to-end demo."""

from __future__ import annotations

import click


@click.command()
@click.option("--months", default=3, show_default=True, type=click.IntRange(1, 24), help="Renewal months to run.")
def demo(months: int) -> None:
    """Run months of billing against the bundled emulator with a real Celery worker and beat.

    A webhook receiver on a loopback port gets the event stream; the demo ends with what it received.
    """
    from billing.demo import run_demo

    if not run_demo(months=months):
        raise SystemExit(1)
