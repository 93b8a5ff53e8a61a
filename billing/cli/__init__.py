"""The `billing` console script. Each subcommand group lives in its own module."""

from __future__ import annotations

import click

from billing import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="billing")
def main() -> None:
    """Recurring billing on the Tpaga card API."""


def _register() -> None:
    from billing.cli import db, sandbox

    main.add_command(sandbox.sandbox)
    main.add_command(db.db)


_register()
