"""The `billing` console script. Each subcommand group lives in its own module."""

from __future__ import annotations

import click

from billing import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="billing")
def main() -> None:
    """Recurring billing on the Tpaga card API."""


def _register() -> None:
    from billing.cli import db, demo, sandbox

    main.add_command(sandbox.sandbox)
    main.add_command(db.db)
    main.add_command(demo.demo)

    from billing.cli import catalog, events, metrics, ops, seed, webhooks

    for command in (catalog.plans, catalog.customers, catalog.cards, catalog.subscriptions, seed.seed):
        main.add_command(command)
    main.add_command(webhooks.webhooks)
    main.add_command(events.events)
    for command in (ops.tick, ops.status, ops.report, ops.review, ops.refund, ops.resume, ops.clock):
        main.add_command(command)
    main.add_command(metrics.metrics)

    from billing.cli import inspect

    main.add_command(inspect.invoices)
    catalog.subscriptions.add_command(inspect.subscriptions_show)


_register()
