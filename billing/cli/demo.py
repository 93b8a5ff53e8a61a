"""`billing demo`: the embedded end-to-end demo, and with --web the seed's browser flow."""

from __future__ import annotations

import click


@click.command()
@click.option("--months", default=3, show_default=True, type=click.IntRange(1, 24), help="Renewal months to run.")
@click.option(
    "--web",
    is_flag=True,
    help="Instead: serve the card form and a small shop to sign up in a browser (docs/checkout.md).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="With --web: the address both sites bind.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="With --web: the shop's port (0 picks a free one); the emulator takes a free one.",
)
def demo(months: int, web: bool, host: str, port: int) -> None:
    """Run months of billing against the bundled emulator with a real Celery worker and beat.

    A webhook receiver on a loopback port gets the event stream; the demo ends with what it received.

    With --web it runs until Ctrl-C: the emulator's checkout page tokenizes a test card in the browser, the shop
    signs the customer up with the public tasks, and a real worker charges the first invoice.
    """
    if web:
        from billing.webdemo import run_web_demo

        run_web_demo(host, port)
        return
    from billing.demo import run_demo

    if not run_demo(months=months):
        raise SystemExit(1)
