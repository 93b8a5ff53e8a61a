"""`billing sandbox`: run the bundled Tpaga emulator."""

from __future__ import annotations

import click


@click.command()
def sandbox() -> None:
    """Run the Tpaga sandbox emulator (placeholder; filled in by the emulator work)."""
    raise click.ClickException("not built yet")
