"""`billing metrics serve`: the Prometheus exporter of the business state (billing.metrics)."""

from __future__ import annotations

import click

from billing.cli.common import database_option, handle_errors, load_settings
from billing.metrics import DEFAULT_HISTORY_REFRESH_SECONDS, DEFAULT_HOST, DEFAULT_PORT


@click.group()
def metrics() -> None:
    """Prometheus metrics read from the database: invoices, outcomes, review queue, due lag, pause, MRR."""


@metrics.command("serve")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option(
    "--history-refresh-seconds",
    default=DEFAULT_HISTORY_REFRESH_SECONDS,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How often the counts over whole tables (invoices, attempts, refunds, recovered, MRR) are read again "
    "in the background; 0 reads them on every scrape (costly on a large database).",
)
@database_option
@handle_errors
def serve(host: str, port: int, history_refresh_seconds: float, database_url: str | None) -> None:
    """Serve /metrics. A scrape reads the live figures (index lookups: review queue, due lag, pause, refund
    deadline, periodic tasks) and serves the latest background read of the counts."""
    from billing.bootstrap import build_clock
    from billing.db.engine import make_session_factory
    from billing.metrics import (
        BillingCollector,
        ScrapeError,
        make_http_server,
        read_engine,
        read_history,
        read_live,
        registry_for,
    )

    settings = load_settings(database_url)
    engine = read_engine(settings.database_url)
    clock = build_clock(settings, make_session_factory(engine))
    # A first read now: a wrong URL or an unmigrated database fails here, once, with the usual clear message.
    try:
        read_live(engine, clock)
        collector = BillingCollector(
            lambda: read_live(engine, clock), lambda: read_history(engine, clock), history_refresh_seconds
        )
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
        collector.close()
        engine.dispose()
