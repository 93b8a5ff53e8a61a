"""`billing metrics serve`: the Prometheus exporter of the business state (billing.metrics)."""

from __future__ import annotations

import click

from billing.cli.common import database_option, handle_errors, load_settings
from billing.metrics import DEFAULT_HOST, DEFAULT_PORT


@click.group()
def metrics() -> None:
    """Prometheus metrics read from the database: invoices, outcomes, review queue, due lag, pause, MRR."""


@metrics.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@database_option
@handle_errors
def serve(host: str, port: int, database_url: str | None) -> None:
    """Serve /metrics. A scrape reads the live figures (index lookups: review queue, due lag, pause, refund
    deadline, periodic tasks) and the counts the database maintains (invoices, attempts, refunds, recovered,
    MRR, webhook backlog), in one snapshot, without a table scan."""
    from billing.bootstrap import build_clock
    from billing.db.engine import make_session_factory
    from billing.metrics import (
        BillingCollector,
        ScrapeError,
        fold,
        make_http_server,
        read_all,
        read_engine,
        registry_for,
    )

    settings = load_settings(database_url)
    engine = read_engine(settings.database_url)
    clock = build_clock(settings, make_session_factory(engine))
    # A first read now: a wrong URL or an unmigrated database fails here, once, with the usual clear message.
    try:
        read_all(engine, clock)
        collector = BillingCollector(lambda: read_all(engine, clock), lambda: fold(engine))
    except ScrapeError as exc:
        raise exc.__cause__ or exc from None
    server = make_http_server(host, port, registry_for(collector))
    click.echo(f"serving billing metrics on http://{host}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.dispose()
