"""`billing webhooks`: the endpoints the event stream is delivered to, and a local receiver to try them with.

A secret is printed once, when it is made (`add`, `rotate-secret`), and never again: `list` and `--json` leave
it out. `--secret -` reads it from stdin, which keeps it out of shell history and `ps`.
"""

from __future__ import annotations

import re
import sys
import threading

import click

from billing.cli.common import (
    ID,
    database_option,
    echo_json,
    echo_table,
    format_time,
    handle_errors,
    json_option,
    load_settings,
    open_context,
    parse_when,
)
from billing.clock import SystemClock

# The shape of every type in the catalogue (docs/events.md); a typo such as "invoice paid" is caught here
# rather than subscribing the endpoint to an event that never comes.
EVENT_TYPE = re.compile(r"[a-z][a-z_]*(\.[a-z_]+)+")


def parse_event_types(text: str | None, param_hint: str) -> list[str] | None:
    """'invoice.paid,subscription.past_due' -> the types (None: all of them)."""
    if text is None:
        return None
    types = [t.strip() for t in text.split(",") if t.strip()]
    if not types:
        raise click.BadParameter("give at least one event type, e.g. invoice.paid", param_hint=param_hint)
    for name in types:
        if len(name) > 48 or not EVENT_TYPE.fullmatch(name):
            raise click.BadParameter(
                f"{name[:60]!r} is not an event type (e.g. invoice.paid; see docs/events.md)", param_hint=param_hint
            )
    return types


def _read_secret(secret: str | None, param_hint: str = "--secret") -> str | None:
    if secret == "-":
        secret = sys.stdin.readline().strip()
        if not secret:
            raise click.BadParameter("no secret on stdin", param_hint=param_hint)
    return secret


@click.group()
def webhooks() -> None:
    """Endpoints that receive the event stream (signed webhooks or celery://QUEUE/TASK), and a local receiver."""


@webhooks.command("add")
@click.argument("url")
@click.option("--events", "events_", default=None, metavar="TYPE,...", help="Only these event types [default: all].")
@click.option("--secret", default=None, metavar="whsec_...", help="Sign with this secret ('-': read stdin).")
@json_option
@database_option
@handle_errors
def add(url: str, events_: str | None, secret: str | None, as_json: bool, database_url: str | None) -> None:
    """Register URL: https (http only on loopback) or celery://QUEUE/TASK_NAME.

    It receives the events from now on (`billing webhooks replay` sends older ones). The secret is printed
    once: store it where the receiver can verify signatures with it.
    """
    from billing.services import delivery

    types = parse_event_types(events_, "--events")
    with open_context(load_settings(database_url)) as ctx:
        new = delivery.add_endpoint(ctx, url, event_types=types, secret=_read_secret(secret))
    if as_json:
        echo_json({"endpoint_id": new.endpoint_id, "url": new.url, "events": types or "all", "secret": new.secret})
        return
    click.echo(f"endpoint {new.endpoint_id}: {new.url} ({', '.join(types) if types else 'all events'})")
    if new.secret is not None:
        click.echo(f"secret: {new.secret}")
        click.echo("(shown once: receivers verify each request's signature with it)")


@webhooks.command("list")
@json_option
@database_option
@handle_errors
def list_(as_json: bool, database_url: str | None) -> None:
    """Endpoints with their status and backlog (never their secrets)."""
    from billing.services import delivery

    with open_context(load_settings(database_url)) as ctx:
        rows = delivery.list_endpoints(ctx)
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["id", "url", "events", "status", "pending", "oldest pending", "failing since"],
        [
            (
                r["endpoint_id"],
                r["url"],
                r["events"] if isinstance(r["events"], str) else ",".join(r["events"]),
                r["status"],
                r["pending"],
                r["oldest_pending_offset"],
                r["failing_since"],
            )
            for r in rows
        ],
        empty="no endpoints (add one with `billing webhooks add URL`)",
    )


@webhooks.command("remove")
@click.argument("endpoint_id", metavar="ID", type=ID)
@database_option
@handle_errors
def remove(endpoint_id: int, database_url: str | None) -> None:
    """Stop delivering to an endpoint (what it has pending is dropped)."""
    from billing.services import delivery

    with open_context(load_settings(database_url)) as ctx:
        delivery.remove_endpoint(ctx, endpoint_id)
    click.echo(f"endpoint {endpoint_id} removed")


@webhooks.command("test")
@click.argument("endpoint_id", metavar="ID", type=ID)
@database_option
@handle_errors
def test(endpoint_id: int, database_url: str | None) -> None:
    """Send a signed `webhook.test` event to a webhook endpoint now and print its answer.

    The event is not part of the stream: it has no offset, it is not stored and it is never retried.
    """
    from billing.db.models import StreamEvent
    from billing.services import delivery, stream
    from billing.services.delivery import DeliveryFailed
    from billing.webhooks import WebhookSender

    with open_context(load_settings(database_url)) as ctx:
        endpoint = delivery.get_endpoint(ctx, endpoint_id)
        if endpoint.kind != "webhook":
            raise click.ClickException(
                f"endpoint {endpoint_id} is a Celery endpoint: `test` sends to webhook endpoints only"
            )
        # A transient row, never added to a session: the stream stays exactly as it was.
        event = StreamEvent(
            event_id=stream.new_event_id(),
            type="webhook.test",
            created_at=ctx.clock.now(),
            data={"endpoint_id": endpoint_id},
        )
    try:
        status = WebhookSender().post(endpoint, event)
    except DeliveryFailed as exc:
        raise click.ClickException(f"endpoint {endpoint_id} was not reached: {exc}") from None
    if not 200 <= status < 300:
        raise click.ClickException(f"endpoint {endpoint_id} answered HTTP {status} to webhook.test: not acknowledged")
    click.echo(f"endpoint {endpoint_id} answered HTTP {status} to webhook.test {event.event_id}: acknowledged")


@webhooks.command("replay")
@click.argument("endpoint_id", metavar="ID", type=ID)
@click.option("--from-offset", type=click.IntRange(min=0), default=None, metavar="N", help="From this offset on.")
@click.option("--since", default=None, metavar="TIME", help="Events created at or after TIME (ISO 8601, naive = UTC).")
@database_option
@handle_errors
def replay(endpoint_id: int, from_offset: int | None, since: str | None, database_url: str | None) -> None:
    """Send an endpoint's events again, in order, from an offset (inclusive) or a time."""
    from billing.services import delivery

    if (from_offset is None) == (since is None):
        raise click.UsageError("give exactly one of --from-offset N or --since TIME")
    since_at = parse_when(since, "--since")
    with open_context(load_settings(database_url)) as ctx:
        queued = delivery.replay(ctx, endpoint_id, from_offset=from_offset, since=since_at)
    where = f"offset {from_offset}" if from_offset is not None else format_time(since_at)
    if not queued:
        click.echo(f"nothing to replay: endpoint {endpoint_id} has no events from {where} on")
        return
    click.echo(f"queued {queued} event(s) from {where} for endpoint {endpoint_id}; they go out in order")


@webhooks.command("rotate-secret")
@click.argument("endpoint_id", metavar="ID", type=ID)
@click.option("--secret", default=None, metavar="whsec_...", help="The new secret [default: a new random one].")
@click.option("--retire-old", is_flag=True, help="Instead: sign with the newest secret only.")
@database_option
@handle_errors
def rotate_secret(endpoint_id: int, secret: str | None, retire_old: bool, database_url: str | None) -> None:
    """Give an endpoint a new secret (printed once).

    Requests are then signed with the new and the old secrets, so receivers can move at their own pace; once
    they have, `--retire-old` signs with the new one only.
    """
    from billing.services import delivery

    if retire_old and secret is not None:
        raise click.UsageError("--retire-old takes no --secret: it keeps the newest secret and drops the others")
    with open_context(load_settings(database_url)) as ctx:
        if retire_old:
            retired = delivery.retire_old_secrets(ctx, endpoint_id)
            click.echo(f"endpoint {endpoint_id} signs with its newest secret only ({retired} older retired)")
            return
        new = delivery.rotate_secret(ctx, endpoint_id, _read_secret(secret))
    click.echo(f"secret: {new}")
    click.echo(
        f"(shown once) endpoint {endpoint_id} signs with it and the previous secret until "
        f"`billing webhooks rotate-secret {endpoint_id} --retire-old`"
    )


@webhooks.command("listen")
@click.option("--port", default=8099, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--secret",
    "secrets",
    multiple=True,
    required=True,
    metavar="whsec_...",
    help="The endpoint's secret; repeat during a rotation; '-' reads one from stdin.",
)
@click.option(
    "--forward", default=None, metavar="URL", help="Pass verified events on to URL (its status is the answer)."
)
@click.option("--json", "as_json", is_flag=True, help="Print each event's body as one JSON line.")
@handle_errors
def listen(port: int, host: str, secrets: tuple[str, ...], forward: str | None, as_json: bool) -> None:
    """A local receiver: verifies each request's signature and prints each event, one line each.

    Verified events get 200 (or, with --forward, the status of URL); a bad signature gets 400 and a line on
    stderr. Point an endpoint at it with `billing webhooks add http://127.0.0.1:PORT/`. Ctrl-C stops it.
    """
    import json

    from billing.listener import Heard, Listener, summary
    from billing.services import delivery

    checked = [delivery.check_secret(str(_read_secret(s))) for s in secrets]
    if forward is not None:
        delivery.check_url(forward)
        if forward.startswith("celery://"):
            raise click.BadParameter("forwards go to an http(s) URL", param_hint="--forward")
    lock = threading.Lock()

    def show(heard: Heard) -> None:
        with lock:
            if heard.body is None:
                click.echo(f"{_now()}  {summary(heard)}", err=True)
            elif as_json:
                click.echo(json.dumps(heard.body, sort_keys=True))
            else:
                click.echo(f"{_now()}  {summary(heard)}")

    listener = Listener(checked, show, host=host, port=port, forward=forward)
    try:
        listener.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(
        f"listening on {listener.url}, verifying with {len(checked)} secret(s)"
        + (f", forwarding to {forward}" if forward else "")
        + "; Ctrl-C to stop",
        err=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()


def _now() -> str:
    return SystemClock().now().strftime("%H:%M:%S")
