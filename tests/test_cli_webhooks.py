"""`billing webhooks ...` and `billing events ...`: endpoints, the test event, replay, rotation, the local listener
and reading the stream, against real HTTP receivers and `billing` subprocesses where a command keeps running."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import requests
from sqlalchemy import func, select

from billing.bootstrap import build_context
from billing.config import Settings
from billing.db.models import Delivery, Endpoint, StreamEvent
from billing.listener import Heard, Listener
from billing.services import delivery, stream
from billing.services.context import Context
from billing.webhooks import WebhookSender
from tasks.testing import free_port, private_redis_db, process_env, worker
from tests.fakes import FakeGateway
from tests.procs import send_by_name, wait_until
from tests.receiver import Receiver
from tests.test_cli_common import Cli, make_cli

BILLING = str(Path(sys.executable).with_name("billing"))
SECRET = delivery.new_secret()


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.chdir(tmp_path)
    return make_cli(sqlite_url)


@pytest.fixture
def ctx(cli: Cli) -> Iterator[Context]:
    """The services on the CLI's database, for what the tests set up and check."""
    context = build_context(Settings(database_url=str(cli.env["DATABASE_URL"])), gateway=FakeGateway())
    yield context
    context.sessions.kw["bind"].dispose()


def emit(ctx: Context, type_: str, **fields: Any) -> None:
    with ctx.unit_of_work() as session:
        stream.emit(session, ctx.clock.now(), type_, **fields)


def count(ctx: Context, model: Any) -> int:
    with ctx.sessions() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def add_endpoint(cli: Cli, url: str, *extra: str, secret: str | None = None) -> tuple[int, str | None]:
    args = ["webhooks", "add", url, *extra] + (["--secret", "-"] if secret else [])
    out = json.loads(cli.ok(*args, "--json", input=secret).stdout)
    return int(out["endpoint_id"]), out["secret"]


class Proc:
    """A `billing ...` subprocess whose stdout and stderr lines are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [BILLING, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for pipe, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(pipe, lines), daemon=True).start()

    @staticmethod
    def _read(pipe: IO[str] | None, lines: list[str]) -> None:
        assert pipe is not None
        for line in pipe:
            lines.append(line.rstrip("\n"))

    def wait_out(self, n: int, what: str) -> list[str]:
        return list(wait_until(lambda: len(self.out) >= n and self.out[:], f"{what}; stderr: {self.err[-5:]}"))

    def wait_err(self, text: str) -> str:
        found: str = wait_until(
            lambda: next((line for line in self.err if text in line), None) or self._died(), f"{text!r} on stderr"
        )
        return found

    def _died(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"billing exited {self.proc.returncode}: {self.err[-10:]}")

    def interrupt(self) -> int:
        """Ctrl-C, as a person stops it."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def billing_proc(procs: list[Proc], cli: Cli, tmp_path: Path, *args: str) -> Proc:
    proc = Proc(list(args), process_env({"DATABASE_URL": str(cli.env["DATABASE_URL"])}), tmp_path)
    procs.append(proc)
    return proc


def signed_post(url: str, secret: str, body: dict[str, Any], event_id: str | None = None) -> int:
    """What the delivery loop sends, built by the real sender for an event that is not stored."""
    event = StreamEvent(
        event_id=event_id or stream.new_event_id(),
        type=body["type"],
        created_at=datetime.now(UTC),
        stream_offset=body.get("offset"),
        subscription_id=body.get("subscription_id"),
        subscription_seq=body.get("subscription_seq"),
        data=body.get("data", {}),
    )
    return WebhookSender().post(Endpoint(url=url, kind="webhook", secret=secret), event)


# --- endpoints -------------------------------------------------------------------------------------------


def test_add_prints_the_secret_once_and_list_never_shows_it(cli: Cli) -> None:
    out = cli.ok("webhooks", "add", "http://127.0.0.1:9/hooks", "--events", "invoice.paid, subscription.past_due")
    [secret] = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("secret: ")]
    assert delivery.check_secret(secret) == secret
    assert "endpoint 1: http://127.0.0.1:9/hooks (invoice.paid, subscription.past_due)" in out.stdout
    celery_id, celery_secret = add_endpoint(cli, "celery://app.events/app.on_billing_event")
    assert (celery_id, celery_secret) == (2, None)
    listed = cli.ok("webhooks", "list").stdout
    assert "invoice.paid,subscription.past_due" in listed and "celery://app.events/app.on_billing_event" in listed
    as_json = cli.json("webhooks", "list")
    assert [(r["endpoint_id"], r["status"], r["pending"]) for r in as_json] == [(1, "active", 0), (2, "active", 0)]
    assert secret not in listed and secret not in json.dumps(as_json) and "whsec_" not in listed
    cli.ok("webhooks", "remove", "1")
    assert [r["endpoint_id"] for r in cli.json("webhooks", "list")] == [2]
    cli.fails("webhooks", "remove", "1", match="endpoint 1 does not exist")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "http://example.com/hooks"], 1, "must use https unless it points at a loopback address"),
        (["add", "ftp://127.0.0.1/x"], 1, "must be http(s)://"),
        (["add", "celery://billing.events"], 1, "a Celery endpoint is celery://QUEUE/TASK_NAME"),
        (["add", "https://hooks.example.com/", "--secret", "hunter2"], 1, "a webhook secret is whsec_"),
        (["add", "https://hooks.example.com/", "--secret", "whsec_c2hvcnQ="], 1, "at least 24 bytes"),
        (["add", "celery://q/app.task", "--secret", SECRET], 1, "a Celery endpoint is not signed"),
        (["add", "https://hooks.example.com/", "--events", "invoice paid"], 2, "'invoice paid' is not an event type"),
        (["add", "https://hooks.example.com/", "--events", ","], 2, "give at least one event type"),
        (["remove", "99"], 1, "endpoint 99 does not exist"),
        (["test", "99"], 1, "endpoint 99 does not exist"),
        (["test", "2"], 1, "endpoint 2 is a Celery endpoint"),
        (["replay", "99", "--from-offset", "1"], 1, "endpoint 99 does not exist"),
        (["replay", "1"], 2, "give exactly one of --from-offset N or --since TIME"),
        (["replay", "1", "--from-offset", "1", "--since", "2026-01-01"], 2, "give exactly one of"),
        (["replay", "1", "--since", "last week"], 2, "not an ISO 8601 date or time"),
        (["replay", "1", "--from-offset", "-1"], 2, "--from-offset"),
        (["rotate-secret", "99"], 1, "endpoint 99 does not exist"),
        (["rotate-secret", "99", "--retire-old"], 1, "endpoint 99 does not exist"),
        (["rotate-secret", "2"], 1, "a Celery endpoint has no secret"),
        (["rotate-secret", "1", "--secret", "whsec_bad"], 1, "a webhook secret"),
        (["rotate-secret", "1", "--retire-old", "--secret", SECRET], 2, "--retire-old takes no --secret"),
        (["listen", "--secret", "hunter2"], 1, "a webhook secret is whsec_"),
        (["listen", "--secret", SECRET, "--forward", "http://example.com/"], 1, "must use https"),
        (["listen", "--secret", SECRET, "--forward", "celery://q/t"], 2, "forwards go to an http(s) URL"),
        (["listen"], 2, "Missing option '--secret'"),
    ],
)
def test_every_mistake_gets_a_clean_message_and_changes_nothing(
    cli: Cli, ctx: Context, args: list[str], code: int, message: str
) -> None:
    add_endpoint(cli, "http://127.0.0.1:9/hooks", secret=SECRET)
    add_endpoint(cli, "celery://app.events/app.on_billing_event")
    before = cli.json("webhooks", "list")
    with ctx.sessions() as session:
        secrets_before = list(session.execute(select(Endpoint.secret).order_by(Endpoint.id)).scalars())
    cli.fails("webhooks", *args, match=message, code=code)
    assert cli.json("webhooks", "list") == before
    with ctx.sessions() as session:
        assert list(session.execute(select(Endpoint.secret).order_by(Endpoint.id)).scalars()) == secrets_before


def test_test_sends_a_signed_event_that_never_enters_the_stream(cli: Cli, ctx: Context) -> None:
    with Receiver(SECRET).start() as receiver:
        endpoint_id, _ = add_endpoint(cli, receiver.url, "--events", "invoice.paid", secret=SECRET)
        out = cli.ok("webhooks", "test", str(endpoint_id)).stdout
        [got] = receiver.received
        assert got.verified and got.status == 200
        assert got.body["type"] == "webhook.test" and got.body["offset"] is None
        assert got.body["data"] == {"endpoint_id": endpoint_id}
        assert f"answered HTTP 200 to webhook.test {got.webhook_id}: acknowledged" in out
        receiver.decide = lambda body, attempt: 503
        cli.fails("webhooks", "test", str(endpoint_id), match=f"endpoint {endpoint_id} answered HTTP 503")
    # The receiver is gone: nothing listens on its port any more.
    cli.fails("webhooks", "test", str(endpoint_id), match="was not reached: not reached (ConnectionError)")
    assert count(ctx, StreamEvent) == 0 and count(ctx, Delivery) == 0
    assert cli.json("events", "list") == []
    assert cli.json("webhooks", "list")[0]["status"] == "active"  # a test is not a delivery: nothing recorded


def test_rotation_signs_with_both_secrets_until_the_old_one_is_retired(cli: Cli) -> None:
    port = free_port()
    endpoint_id, old = add_endpoint(cli, f"http://127.0.0.1:{port}/")
    out = cli.ok("webhooks", "rotate-secret", str(endpoint_id)).stdout
    [new] = [line.split()[1] for line in out.splitlines() if line.startswith("secret: ")]
    assert new != old and delivery.check_secret(new) == new
    assert new not in cli.ok("webhooks", "list", "--json").stdout

    def test_with(secret: str | None) -> tuple[int, list[Heard]]:
        heard: list[Heard] = []
        with Listener([str(secret)], heard.append, port=port):
            result = cli.run("webhooks", "test", str(endpoint_id))
        return result.exit_code, heard

    assert test_with(old)[0] == 0  # receivers that have not moved yet still verify
    assert test_with(new)[0] == 0
    assert "(1 older retired)" in cli.ok("webhooks", "rotate-secret", str(endpoint_id), "--retire-old").stdout
    code, heard = test_with(old)
    assert code == 1 and [(h.status, h.verified) for h in heard] == [(400, False)]
    assert test_with(new)[0] == 0


# --- the local listener ----------------------------------------------------------------------------------


def test_listen_verifies_prints_each_event_and_rejects_bad_signatures(
    cli: Cli, tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    listen = billing_proc(procs, cli, tmp_path, "webhooks", "listen", "--port", str(port), "--secret", SECRET)
    listen.wait_err(f"listening on http://127.0.0.1:{port}/")
    url = f"http://127.0.0.1:{port}/"
    paid = {"type": "invoice.paid", "offset": 5, "subscription_id": 7, "subscription_seq": 2}
    paid["data"] = {"invoice_id": 11, "amount": "45000.00", "currency": "COP"}
    assert signed_post(url, SECRET, paid, event_id="evt_one") == 200
    [line] = listen.wait_out(1, "the event's line")
    assert "200  #5  invoice.paid  sub 7 seq 2  invoice_id=11  amount=45000.00  currency=COP  evt_one" in line
    assert signed_post(url, SECRET, paid, event_id="evt_one") == 200  # a retry: same webhook-id
    assert listen.wait_out(2, "the retry's line")[1].endswith("evt_one  (again)")
    assert signed_post(url, delivery.new_secret(), paid) == 400
    assert "400 REJECTED" in listen.wait_err("No matching signature found")
    garbled = {"webhook-id": "evt_x", "webhook-timestamp": "1", "webhook-signature": "garbage"}
    assert requests.post(url, data=b"{}", headers=garbled, timeout=5).status_code == 400
    unsigned = requests.post(url, json={"type": "invoice.paid"}, timeout=5)
    assert unsigned.status_code == 400
    assert requests.get(url, timeout=5).status_code == 405
    listen.wait_err("Missing required headers")
    assert len(listen.out) == 2  # rejected requests are never printed as events
    # The port is taken now: a second listener says so.
    cli.fails("webhooks", "listen", "--port", str(port), "--secret", SECRET, match=f"cannot listen on 127.0.0.1:{port}")
    assert listen.interrupt() == 0
    assert not any("Traceback" in line for line in listen.err)


def test_listen_forwards_verified_events_and_answers_with_the_apps_status(
    cli: Cli, tmp_path: Path, procs: list[Proc]
) -> None:
    new = delivery.new_secret()
    with Receiver(SECRET).start() as app:
        port = free_port()
        listen = billing_proc(
            procs, cli, tmp_path, "webhooks", "listen", "--port", str(port), "--json", "--forward", app.url,
            "--secret", new, "--secret", SECRET,
        )  # fmt: skip
        listen.wait_err("verifying with 2 secret(s), forwarding to")
        url = f"http://127.0.0.1:{port}/"
        body = {"type": "customer.created", "offset": 1, "data": {"customer_id": 3}}
        assert signed_post(url, SECRET, body, event_id="evt_fwd") == 200
        [forwarded] = app.received
        assert forwarded.verified and forwarded.webhook_id == "evt_fwd"  # the app verifies the same signature
        [line] = listen.wait_out(1, "the JSON line")
        assert json.loads(line) == forwarded.body and forwarded.body["data"] == {"customer_id": 3}
        # Verified here with the new secret, refused by the app that knows only the old one: its 400 is the answer.
        assert signed_post(url, new, body) == 400
        app.decide = lambda body, attempt: 500
        assert signed_post(url, SECRET, body) == 500  # the app failed: the stream will retry
    assert signed_post(url, SECRET, body) == 502  # the app is down
    assert len(listen.wait_out(4, "four lines")) == 4


# --- reading the stream ----------------------------------------------------------------------------------


def test_events_list_reads_the_stream_by_offset_with_filters(cli: Cli, ctx: Context) -> None:
    emit(ctx, "customer.created", customer_id=4)
    for n in range(3):
        emit(ctx, "invoice.paid", subscription_id=1, invoice_id=10 + n)
        emit(ctx, "subscription.past_due", subscription_id=2, invoice_id=20 + n)
    assert stream.sequence(ctx) == 7
    emit(ctx, "invoice.paid", subscription_id=1, invoice_id=13)  # committed, not numbered yet
    with ctx.sessions() as session:
        expected = [json.loads(stream.encode(e)) for e in stream.events_after(session, 0)]
    assert cli.json("events", "list") == expected  # the bodies endpoints receive
    text = cli.ok("events", "list").stdout
    assert text.splitlines()[0].split() == ["offset", "created", "type", "subscription", "seq", "customer", "id"]
    assert "1 committed event(s) wait for their offset" in text
    paid = cli.json("events", "list", "--type", "invoice.paid")
    assert [(e["offset"], e["subscription_seq"], e["data"]["invoice_id"]) for e in paid] == [
        (2, 1, 10),
        (4, 2, 11),
        (6, 3, 12),
    ]
    two = cli.json("events", "list", "--subscription", "2", "--after-offset", "3")
    assert [(e["offset"], e["type"]) for e in two] == [(5, "subscription.past_due"), (7, "subscription.past_due")]
    both = cli.json("events", "list", "--type", "customer.created,invoice.paid", "--limit", "2")
    assert [e["offset"] for e in both] == [1, 2]
    assert "--after-offset 2 for the next ones" in cli.ok("events", "list", "--limit", "2").stdout
    assert "no events after offset 7" in cli.ok("events", "list", "--after-offset", "7").stdout
    cli.fails("events", "list", "--type", "paid", match="'paid' is not an event type", code=2)
    cli.fails("events", "list", "--after-offset", "-3", match="--after-offset", code=2)


def test_events_tail_follows_new_events_in_offset_order(
    cli: Cli, ctx: Context, tmp_path: Path, procs: list[Proc]
) -> None:
    emit(ctx, "invoice.paid", subscription_id=1, invoice_id=1)
    emit(ctx, "customer.created", customer_id=2)
    stream.sequence(ctx)
    tail = billing_proc(procs, cli, tmp_path, "events", "tail", "--interval", "0.2")
    tail.wait_err("following events after offset 2")
    follow = billing_proc(
        procs,
        cli,
        tmp_path,
        "events",
        "tail",
        "--from-offset",
        "1",
        "--type",
        "invoice.paid",
        "--json",
        "--interval",
        "0.2",
    )
    for n in range(2, 5):
        emit(ctx, "invoice.paid", subscription_id=1, invoice_id=n)
    stream.sequence(ctx)
    emit(ctx, "customer.updated", customer_id=2)
    stream.sequence(ctx)
    lines = tail.wait_out(4, "the four new events")
    assert [line.split("  ")[1:3] for line in lines] == [
        ["#3", "invoice.paid"], ["#4", "invoice.paid"], ["#5", "invoice.paid"], ["#6", "customer.updated"]
    ]  # fmt: skip
    bodies = [json.loads(line) for line in follow.wait_out(4, "the invoice.paid events from offset 1")]
    assert [(b["offset"], b["subscription_seq"]) for b in bodies] == [(1, 1), (3, 2), (4, 3), (5, 4)]
    assert tail.interrupt() == 0 and follow.interrupt() == 0
    assert len(tail.out) == 4 and len(follow.out) == 4


def test_reading_commands_fail_cleanly_before_following_anything(cli: Cli, tmp_path: Path) -> None:
    cli.fails("events", "tail", "--type", "invoice paid", match="'invoice paid' is not an event type", code=2)
    cli.fails("events", "tail", "--from-offset", "0", match="--from-offset", code=2)
    cli.fails("events", "list", "--subscription", "0", match="--subscription", code=2)
    fresh = Cli({"DATABASE_URL": f"sqlite:///{tmp_path}/never-migrated.db", "BILLING_CLOCK": None})
    for args in (["events", "tail"], ["events", "list"], ["webhooks", "list"]):
        fresh.fails(*args, match="run `billing db upgrade` first")


# --- replay, through a real worker -----------------------------------------------------------------------


@pytest.mark.celery
@pytest.mark.redis
@pytest.mark.slow
def test_replay_resends_through_the_worker_to_a_listener_in_order(
    cli: Cli, ctx: Context, tmp_path: Path, procs: list[Proc], redis_server_url: str
) -> None:
    port = free_port()
    endpoint_id, secret = add_endpoint(cli, f"http://127.0.0.1:{port}/")
    listen = billing_proc(procs, cli, tmp_path, "webhooks", "listen", "--port", str(port), "--secret", str(secret))
    listen.wait_err("listening on")
    for n in range(3):
        emit(ctx, "invoice.paid", subscription_id=1, invoice_id=n)
        emit(ctx, "invoice.paid", subscription_id=2, invoice_id=10 + n)
    with private_redis_db(redis_server_url) as broker:
        keys = {k: str(cli.env[k]) for k in ("TPAGA_API_URL", "TPAGA_PRIVATE_KEY", "TPAGA_PUBLIC_KEY")}
        env = process_env({"DATABASE_URL": str(cli.env["DATABASE_URL"]), "CELERY_BROKER_URL": broker, **keys})
        with worker(env, tmp_path / "worker.log", "-Q", "billing.events") as proc:
            proc.wait_for_log(r"ready\.")
            deliver = [("d", "billing.deliver_events", "billing.events", [], {})]
            send_by_name(broker, deliver)
            first = listen.wait_out(6, "six deliveries")
            out = cli.ok("webhooks", "replay", str(endpoint_id), "--from-offset", "4").stdout
            assert f"queued 3 event(s) from offset 4 for endpoint {endpoint_id}" in out
            send_by_name(broker, deliver)
            lines = listen.wait_out(9, "three replayed deliveries")
    fields = [line.split("  ")[1:6] for line in lines]  # status, #offset, type, "sub S seq N", invoice_id=...
    assert all(status == "200" for status, *_ in fields)
    arrived: dict[str, list[tuple[str, str]]] = {}
    for _status, _offset, _type, sub_seq, invoice in fields[:6]:
        sub, seq = sub_seq.split(" seq ")
        arrived.setdefault(sub, []).append((seq, invoice))
    assert arrived == {  # each subscription's events in order, the two subscriptions side by side
        "sub 1": [("1", "invoice_id=0"), ("2", "invoice_id=1"), ("3", "invoice_id=2")],
        "sub 2": [("1", "invoice_id=10"), ("2", "invoice_id=11"), ("3", "invoice_id=12")],
    }
    assert sorted(offset for _, offset, *_ in fields[:6]) == [f"#{n}" for n in range(1, 7)]
    assert sorted(offset for _, offset, *_ in fields[6:]) == ["#4", "#5", "#6"]
    assert all(line.endswith("(again)") for line in lines[6:]) and not any("(again)" in x for x in first)
